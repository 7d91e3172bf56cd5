//! A window's profiles as OTLP `ExportProfilesServiceRequest`s
//! (`opentelemetry.proto.profiles.v1development`): one `ResourceProfiles`
//! per process, whose resource carries the process's semantic-convention
//! attributes, holding one CPU profile; the functions, locations, stacks,
//! strings and attributes of every profile of a request in its shared
//! dictionary.
//!
//! - Python frames are locations with one line (function, line) and the
//!   `profile.frame.type` = `cpython` attribute, as the OpenTelemetry eBPF
//!   profiler marks them; a frame whose code object could not be read is a
//!   Python frame too (function `[unknown code object: ...]`).
//! - pyebpf's other synthetic frames (`[truncated]`, `[partial stack: ...]`,
//!   `[stack table full]`) are functions of those names with no file and no
//!   frame type: they stand for missing frames, not for code.
//! - Values are CPU nanoseconds (samples × period), period 1e9 / rate.
//! - Threads are not known (the store aggregates a process's threads), so
//!   samples carry no `thread.*` attributes.
use std::collections::HashMap;
use std::hash::Hash;
use std::time::UNIX_EPOCH;

use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::profiles::v1development as pb;
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use crate::daemon::WindowProfile;
use crate::profile::Frame;

/// The semantic-convention key marking a frame's runtime, and its value
/// for Python frames.
pub const FRAME_TYPE: &str = "profile.frame.type";
pub const FRAME_TYPE_CPYTHON: &str = "cpython";
pub const FRAME_TYPE_KERNEL: &str = "kernel";
/// A native (C) frame of the target, as the OTel eBPF profiler marks them.
pub const FRAME_TYPE_NATIVE: &str = "native";

/// What every process's resource says about the host and the profiler.
#[derive(Clone, Debug)]
pub struct Context {
    /// `host.name`.
    pub host_name: String,
}

/// Encoded bytes of a `repeated` message entry of `len` bytes (tag and
/// length prefix included): how a table grows as entries are added.
fn entry_bytes(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// A dictionary table with deduplication and a running encoded size.
struct Table<K, V> {
    index: HashMap<K, i32>,
    items: Vec<V>,
}

impl<K: Hash + Eq, V: Message + Default> Table<K, V> {
    /// Index 0 holds the zero value, as the format requires.
    fn new() -> Self {
        Table {
            index: HashMap::new(),
            items: vec![V::default()],
        }
    }

    /// The index of `key`, adding `make()` if new; `bytes` grows by the
    /// entry's encoded size.
    fn intern(&mut self, key: K, bytes: &mut usize, make: impl FnOnce() -> V) -> i32 {
        if let Some(&i) = self.index.get(&key) {
            return i;
        }
        let v = make();
        *bytes += entry_bytes(v.encoded_len());
        let i = self.items.len() as i32;
        self.items.push(v);
        self.index.insert(key, i);
        i
    }
}

/// One request being built.
struct Builder {
    strings: HashMap<String, i32>,
    string_table: Vec<String>,
    functions: Table<(i32, i32, i64), pb::Function>,
    locations: Table<Frame, pb::Location>,
    stacks: Table<Vec<i32>, pb::Stack>,
    attributes: Table<(i32, String), pb::KeyValueAndUnit>,
    resources: Vec<pb::ResourceProfiles>,
    /// Encoded size of everything above, give or take a few bytes.
    bytes: usize,
}

impl Builder {
    fn new() -> Self {
        Builder {
            strings: HashMap::from([(String::new(), 0)]),
            string_table: vec![String::new()],
            functions: Table::new(),
            locations: Table::new(),
            stacks: Table::new(),
            attributes: Table::new(),
            resources: Vec::new(),
            bytes: 16,
        }
    }

    fn string(&mut self, s: &str) -> i32 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.string_table.len() as i32;
        self.bytes += entry_bytes(s.len());
        self.string_table.push(s.to_string());
        self.strings.insert(s.to_string(), i);
        i
    }

    /// An integer attribute (interned apart from strings of the same text).
    fn int_attribute(&mut self, key: &str, value: i64) -> i32 {
        let k = self.string(key);
        self.attributes
            .intern((k, format!("int:{value}")), &mut self.bytes, || {
                pb::KeyValueAndUnit {
                    key_strindex: k,
                    value: Some(AnyValue {
                        value: Some(any_value::Value::IntValue(value)),
                    }),
                    unit_strindex: 0,
                }
            })
    }

    /// The sample attributes of a stack's `thread` root frame: its
    /// `thread.id` and `thread.name` (semantic conventions).
    fn thread_attributes(&mut self, f: &Frame) -> Option<Vec<i32>> {
        let Frame::Thread { tid, name } = f else {
            return None;
        };
        Some(vec![
            self.int_attribute("thread.id", i64::from(*tid)),
            self.string_attribute("thread.name", name),
        ])
    }

    fn string_attribute(&mut self, key: &str, value: &str) -> i32 {
        let k = self.string(key);
        let v = value.to_string();
        self.attributes
            .intern((k, v.clone()), &mut self.bytes, || pb::KeyValueAndUnit {
                key_strindex: k,
                value: Some(string_value(v)),
                unit_strindex: 0,
            })
    }

    fn location(&mut self, f: &Frame) -> i32 {
        if let Some(&i) = self.locations.index.get(f) {
            return i;
        }
        let name = self.string(&f.function_name());
        let (file, first_line, line, frame_type) = match f {
            Frame::Python {
                filename,
                first_line,
                line,
                ..
            } => (
                self.string(filename),
                i64::from(*first_line),
                i64::from(*line),
                Some(FRAME_TYPE_CPYTHON),
            ),
            Frame::Unknown { .. } => (0, 0, 0, Some(FRAME_TYPE_CPYTHON)),
            Frame::Kernel { .. } => (0, 0, 0, Some(FRAME_TYPE_KERNEL)),
            Frame::Native { .. } => (
                self.string(f.filename().unwrap_or("")),
                0,
                f.line().map_or(0, i64::from),
                Some(FRAME_TYPE_NATIVE),
            ),
            _ => (0, 0, 0, None),
        };
        let function = self
            .functions
            .intern((name, file, first_line), &mut self.bytes, || pb::Function {
                name_strindex: name,
                system_name_strindex: name,
                filename_strindex: file,
                start_line: first_line,
            });
        let attrs = match frame_type {
            Some(t) => vec![self.string_attribute(FRAME_TYPE, t)],
            None => Vec::new(),
        };
        self.locations
            .intern(f.clone(), &mut self.bytes, || pb::Location {
                mapping_index: 0,
                address: 0,
                lines: vec![pb::Line {
                    function_index: function,
                    line,
                    column: 0,
                }],
                attribute_indices: attrs,
            })
    }

    /// Adds one process's window as a resource of its own.
    fn add(&mut self, ctx: &Context, w: &WindowProfile, profile_id: [u8; 16]) {
        let p = &w.profile;
        // The sample type names the time measured (`cpu`, `wall`,
        // `off-cpu`); values are nanoseconds of it whatever the kind.
        let kind = self.string(p.kind.name());
        let ns = self.string("nanoseconds");
        let period = p.ns_per_value() as i64;
        let mut samples = Vec::with_capacity(p.stack_count());
        for (stack, count) in p.stacks() {
            // A thread root frame is the sample's attributes, not a frame.
            let root = stack.iter().next();
            let attributes = root.and_then(|f| self.thread_attributes(f));
            let frames = stack.len() - usize::from(attributes.is_some());
            // Leaf first, as the format orders a stack.
            let locations: Vec<i32> = stack
                .iter()
                .rev()
                .take(frames)
                .map(|f| self.location(f))
                .collect();
            let attributes = attributes.unwrap_or_default();
            let stack_index =
                self.stacks
                    .intern(locations.clone(), &mut self.bytes, || pb::Stack {
                        location_indices: locations,
                    });
            samples.push(pb::Sample {
                stack_index,
                attribute_indices: attributes,
                link_index: 0,
                values: vec![(count as i64).saturating_mul(period)],
                timestamps_unix_nano: Vec::new(),
            });
        }
        let start = w.start.duration_since(UNIX_EPOCH).unwrap_or_default();
        let duration = w.end.duration_since(w.start).unwrap_or_default();
        let profile = pb::Profile {
            sample_type: Some(pb::ValueType {
                type_strindex: kind,
                unit_strindex: ns,
            }),
            samples,
            time_unix_nano: u64::try_from(start.as_nanos()).unwrap_or(u64::MAX),
            duration_nano: u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
            period_type: Some(pb::ValueType {
                type_strindex: kind,
                unit_strindex: ns,
            }),
            period,
            profile_id: profile_id.to_vec(),
            ..Default::default()
        };
        let rp = pb::ResourceProfiles {
            resource: Some(Resource {
                attributes: resource_attributes(ctx, w),
                ..Default::default()
            }),
            scope_profiles: vec![pb::ScopeProfiles {
                scope: Some(InstrumentationScope {
                    name: "pyebpf".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                profiles: vec![profile],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        };
        self.bytes += entry_bytes(rp.encoded_len());
        self.resources.push(rp);
    }

    fn finish(self) -> ExportProfilesServiceRequest {
        ExportProfilesServiceRequest {
            resource_profiles: self.resources,
            dictionary: Some(pb::ProfilesDictionary {
                mapping_table: vec![pb::Mapping::default()],
                location_table: self.locations.items,
                function_table: self.functions.items,
                link_table: vec![pb::Link::default()],
                string_table: self.string_table,
                attribute_table: self.attributes.items,
                stack_table: self.stacks.items,
            }),
        }
    }
}

fn string_value(s: String) -> AnyValue {
    AnyValue {
        value: Some(any_value::Value::StringValue(s)),
    }
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// The process's resource, in OpenTelemetry's semantic conventions. The
/// command line is never sent (it may hold secrets).
pub fn resource_attributes(ctx: &Context, w: &WindowProfile) -> Vec<KeyValue> {
    use any_value::Value::{IntValue, StringValue};
    let l = &w.labels;
    let s = |v: &str| StringValue(v.to_string());
    let mut a = vec![
        kv("service.name", s(&l.service)),
        kv("process.pid", IntValue(i64::from(l.pid))),
        kv("process.runtime.name", s("cpython")),
        kv("host.name", s(&ctx.host_name)),
    ];
    if !l.exe.is_empty() {
        let name = l.exe.rsplit('/').next().unwrap_or(&l.exe);
        a.push(kv("process.executable.name", s(name)));
        a.push(kv("process.executable.path", s(&l.exe)));
    }
    if !l.python_version.is_empty() {
        a.push(kv("process.runtime.version", s(&l.python_version)));
    }
    if let Some(c) = &l.container_id {
        a.push(kv("container.id", s(c)));
    }
    if let Some(p) = &l.pod_uid {
        a.push(kv("k8s.pod.uid", s(p)));
    }
    a
}

/// The window's requests: processes in pid order, a request closed once its
/// encoded size reaches `max_request_bytes` (so it exceeds that by at most
/// one process's profile). Returns each request's encoded bytes and the
/// number of profiles (processes) in it.
pub fn encode_requests(
    ctx: &Context,
    mut window: Vec<WindowProfile>,
    max_request_bytes: usize,
    mut random: impl FnMut() -> u64,
) -> Vec<(Vec<u8>, u64)> {
    window.sort_by_key(|w| w.labels.pid);
    let mut out = Vec::new();
    let mut b = Builder::new();
    let mut n = 0u64;
    for w in &window {
        let id = (u128::from(random()) << 64 | u128::from(random())) | 1;
        b.add(ctx, w, id.to_le_bytes());
        n += 1;
        if b.bytes >= max_request_bytes {
            out.push((
                std::mem::replace(&mut b, Builder::new())
                    .finish()
                    .encode_to_vec(),
                n,
            ));
            n = 0;
        }
    }
    if n > 0 {
        out.push((b.finish().encode_to_vec(), n));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::labels::ProcessLabels;
    use crate::profile::{CompactProfile, Profile, UnknownReason};
    use std::time::Duration;

    fn py(q: &str, line: u32) -> Frame {
        Frame::Python {
            qualname: q.into(),
            filename: "/app/x.py".into(),
            line,
            first_line: 10,
        }
    }

    fn window(pid: u32, stacks: &[(Vec<Frame>, u64)]) -> WindowProfile {
        let mut p = Profile::new(100);
        for (s, n) in stacks {
            p.add(s.clone(), *n);
        }
        let start = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        WindowProfile {
            labels: ProcessLabels {
                pid,
                command: "python3".into(),
                service: "web".into(),
                exe: "/usr/bin/python3.11".into(),
                cmdline: "python3 app.py --password=hunter2".into(),
                container_id: Some("c0ffee".into()),
                python_version: "3.11.7".into(),
                ..Default::default()
            },
            profile: CompactProfile::from(&p),
            start,
            end: start + Duration::from_secs(10),
        }
    }

    fn ctx() -> Context {
        Context {
            host_name: "node-1".into(),
        }
    }

    fn decode(b: &[u8]) -> ExportProfilesServiceRequest {
        ExportProfilesServiceRequest::decode(b).unwrap()
    }

    fn str_attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|k| k.key == key)
            .and_then(|k| k.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn stacks_functions_lines_and_frame_types() {
        let hot = vec![py("main", 3), py("work", 12)];
        let odd = vec![
            Frame::Truncated,
            Frame::Unknown {
                reason: UnknownReason::Stale,
            },
            py("work", 12),
        ];
        let w = window(7, &[(hot, 5), (odd, 2)]);
        let reqs = encode_requests(&ctx(), vec![w], 1 << 20, || 42);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].1, 1);
        let r = decode(&reqs[0].0);
        let d = r.dictionary.unwrap();
        // Zero values first.
        assert_eq!(d.string_table[0], "");
        assert_eq!(d.function_table[0], pb::Function::default());
        assert_eq!(d.location_table[0], pb::Location::default());
        assert_eq!(d.stack_table[0], pb::Stack::default());
        assert_eq!(d.attribute_table[0], pb::KeyValueAndUnit::default());
        let s = |i: i32| d.string_table[i as usize].as_str();
        let frame = |loc: i32| {
            let l = &d.location_table[loc as usize];
            let f = &d.function_table[l.lines[0].function_index as usize];
            let ty: Vec<String> = l
                .attribute_indices
                .iter()
                .map(|&a| {
                    let kv = &d.attribute_table[a as usize];
                    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                        Some(any_value::Value::StringValue(v)) => {
                            format!("{}={v}", s(kv.key_strindex))
                        }
                        other => panic!("{other:?}"),
                    }
                })
                .collect();
            (
                s(f.name_strindex).to_string(),
                s(f.filename_strindex).to_string(),
                l.lines[0].line,
                f.start_line,
                ty.join(","),
            )
        };
        let p = &r.resource_profiles[0].scope_profiles[0].profiles[0];
        assert_eq!(p.period, 10_000_000);
        assert_eq!(s(p.sample_type.unwrap().type_strindex), "cpu");
        assert_eq!(s(p.sample_type.unwrap().unit_strindex), "nanoseconds");
        assert_eq!(p.time_unix_nano, 1_700_000_000 * 1_000_000_000);
        assert_eq!(p.duration_nano, 10_000_000_000);
        assert_ne!(p.profile_id, vec![0; 16]);
        assert_eq!(p.profile_id.len(), 16);
        let mut got: Vec<(Vec<_>, i64)> = p
            .samples
            .iter()
            .map(|smp| {
                let st = &d.stack_table[smp.stack_index as usize];
                (
                    st.location_indices.iter().map(|&l| frame(l)).collect(),
                    smp.values[0],
                )
            })
            .collect();
        got.sort_by_key(|(_, v)| *v);
        let cpy = "profile.frame.type=cpython".to_string();
        let f = |n: &str, file: &str, line, start, ty: &str| {
            (n.to_string(), file.to_string(), line, start, ty.to_string())
        };
        assert_eq!(
            got,
            vec![
                (
                    vec![
                        f("work", "/app/x.py", 12, 10, &cpy),
                        f("[unknown code object: stale]", "", 0, 0, &cpy),
                        f("[truncated]", "", 0, 0, ""),
                    ],
                    2 * 10_000_000
                ),
                (
                    vec![
                        f("work", "/app/x.py", 12, 10, &cpy),
                        f("main", "/app/x.py", 3, 10, &cpy),
                    ],
                    5 * 10_000_000
                ),
            ]
        );
        // One location per distinct frame, one frame-type attribute.
        assert_eq!(d.location_table.len(), 5);
        assert_eq!(d.attribute_table.len(), 2);
    }

    #[test]
    fn resource_follows_semantic_conventions_without_the_command_line() {
        let w = window(4242, &[(vec![py("f", 1)], 1)]);
        let r = decode(&encode_requests(&ctx(), vec![w], 1 << 20, || 1)[0].0);
        let res = r.resource_profiles[0].resource.as_ref().unwrap();
        use any_value::Value::{IntValue, StringValue};
        let sv = |v: &str| Some(StringValue(v.into()));
        let a = &res.attributes;
        assert_eq!(str_attr(a, "service.name").cloned(), sv("web"));
        assert_eq!(str_attr(a, "process.pid").cloned(), Some(IntValue(4242)));
        assert_eq!(
            str_attr(a, "process.executable.name").cloned(),
            sv("python3.11")
        );
        assert_eq!(
            str_attr(a, "process.executable.path").cloned(),
            sv("/usr/bin/python3.11")
        );
        assert_eq!(str_attr(a, "process.runtime.name").cloned(), sv("cpython"));
        assert_eq!(
            str_attr(a, "process.runtime.version").cloned(),
            sv("3.11.7")
        );
        assert_eq!(str_attr(a, "container.id").cloned(), sv("c0ffee"));
        assert_eq!(str_attr(a, "host.name").cloned(), sv("node-1"));
        assert_eq!(str_attr(a, "k8s.pod.uid"), None);
        let all = format!("{r:?}");
        assert!(!all.contains("hunter2"), "the command line is not sent");
    }

    #[test]
    fn requests_split_by_size_and_share_a_dictionary() {
        let stack: Vec<Frame> = (0..50).map(|i| py(&format!("f{i}"), i)).collect();
        let window: Vec<WindowProfile> = (1..=40)
            .rev()
            .map(|pid| window(pid, &[(stack.clone(), u64::from(pid))]))
            .collect();
        let one = encode_requests(&ctx(), window.clone(), usize::MAX, || 3);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].1, 40);
        let r = decode(&one[0].0);
        // The same frames in every process: interned once.
        assert_eq!(r.dictionary.as_ref().unwrap().location_table.len(), 51);
        let pids: Vec<i64> = r
            .resource_profiles
            .iter()
            .map(
                |rp| match str_attr(&rp.resource.as_ref().unwrap().attributes, "process.pid") {
                    Some(any_value::Value::IntValue(p)) => *p,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(pids, (1..=40).collect::<Vec<i64>>());

        let limit = one[0].0.len() / 4;
        let split = encode_requests(&ctx(), window, limit, || 3);
        assert!(split.len() >= 4, "{}", split.len());
        assert_eq!(split.iter().map(|(_, n)| n).sum::<u64>(), 40);
        for (bytes, n) in &split {
            let r = decode(bytes);
            assert_eq!(r.resource_profiles.len() as u64, *n);
            // Each request stands alone: its dictionary has its frames.
            assert_eq!(r.dictionary.unwrap().location_table.len(), 51);
        }
        // Closed once past the limit, so at most one profile over it.
        let biggest = split.iter().map(|(b, _)| b.len()).max().unwrap();
        assert!(
            biggest < limit + one[0].0.len() / 20,
            "{biggest} vs {limit}"
        );
    }
}
