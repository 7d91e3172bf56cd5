//! A small reader for the kernel's BTF (`/sys/kernel/btf/vmlinux`).
//!
//! Only what the profiler needs: find a struct by name and compute the byte
//! offset of a (nested) member, e.g. `task_struct.thread.fsbase`, so the
//! sampler can read a thread's TLS base without hard-coding a kernel layout.
//!
//! Format: <https://docs.kernel.org/bpf/btf.html>. The input is untrusted in
//! the sense that it must never make us panic: every read is bounds-checked and
//! every type reference is validated when followed.
use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::path::Path;

/// Where the running kernel exposes its own BTF.
pub const SYS_FS_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

const BTF_MAGIC: u16 = 0xeb9f;
/// Size of the fixed part of `struct btf_header`.
const HEADER_MIN_LEN: usize = 24;
/// Size of `struct btf_type`.
const TYPE_LEN: usize = 12;
/// How many typedef/const/volatile/... hops we follow before calling it a loop.
const MAX_MODIFIER_CHAIN: usize = 64;
/// How deep we look through nested anonymous structs/unions.
const MAX_ANON_DEPTH: usize = 32;

// BTF kinds (`BTF_KIND_*`).
const KIND_INT: u8 = 1;
const KIND_PTR: u8 = 2;
const KIND_ARRAY: u8 = 3;
const KIND_STRUCT: u8 = 4;
const KIND_UNION: u8 = 5;
const KIND_ENUM: u8 = 6;
const KIND_FWD: u8 = 7;
const KIND_TYPEDEF: u8 = 8;
const KIND_VOLATILE: u8 = 9;
const KIND_CONST: u8 = 10;
const KIND_RESTRICT: u8 = 11;
const KIND_FUNC: u8 = 12;
const KIND_FUNC_PROTO: u8 = 13;
const KIND_VAR: u8 = 14;
const KIND_DATASEC: u8 = 15;
const KIND_FLOAT: u8 = 16;
const KIND_DECL_TAG: u8 = 17;
const KIND_TYPE_TAG: u8 = 18;
const KIND_ENUM64: u8 = 19;

/// Why BTF could not be read or a member could not be located.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("kernel BTF not found at {path} (kernel built without CONFIG_DEBUG_INFO_BTF)")]
    NotFound { path: String },
    #[error("cannot read kernel BTF at {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("malformed BTF: {0}")]
    Malformed(String),
    #[error("unsupported BTF kind {kind} (type id {id}); this parser knows kinds 1..=19")]
    UnknownKind { kind: u8, id: u32 },
    #[error("no struct or union named `{0}` in BTF")]
    StructNotFound(String),
    #[error("`{path}` has no member `{member}`")]
    MemberNotFound { path: String, member: String },
    #[error("`{path}` is not a struct or union, so it has no member `{member}`")]
    NotAStruct { path: String, member: String },
    #[error("`{path}` is a bitfield or not byte-aligned (bit offset {bit_offset})")]
    NotByteAligned { path: String, bit_offset: u64 },
    #[error("offset of `{path}` ({bytes} bytes) does not fit in 32 bits")]
    TooLarge { path: String, bytes: u64 },
}

fn malformed(msg: impl Into<String>) -> BtfError {
    BtfError::Malformed(msg.into())
}

/// One struct/union member, as stored in BTF.
#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    bit_offset: u32,
    /// 0 for ordinary members.
    bitfield_size: u32,
}

/// One BTF type. Only what member lookups need is kept.
#[derive(Clone, Debug)]
struct Type {
    kind: u8,
    /// `size` for INT/STRUCT/UNION/ENUM/..., `type` for PTR/TYPEDEF/CONST/...
    size_or_type: u32,
    /// Indices into `Btf::members` (structs and unions only; empty otherwise).
    members: Range<usize>,
}

/// Parsed BTF: the type table and string section.
#[derive(Clone, Debug)]
pub struct Btf {
    /// `types[i]` has type id `i + 1` (id 0 is `void`).
    types: Vec<Type>,
    members: Vec<Member>,
    strings: Vec<u8>,
    /// Struct/union name -> first type id with that name.
    by_name: HashMap<Vec<u8>, u32>,
}

/// Bounds-checked reads of `u16`/`u32` in the blob's byte order.
struct Reader<'a> {
    data: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn u32(&self, off: usize) -> Option<u32> {
        let end = off.checked_add(4)?;
        let b: [u8; 4] = self.data.get(off..end)?.try_into().ok()?;
        Some(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
}

impl Btf {
    /// Read and parse the running kernel's BTF from `/sys/kernel/btf/vmlinux`.
    pub fn from_sys_fs() -> Result<Btf, BtfError> {
        Self::from_path(Path::new(SYS_FS_VMLINUX))
    }

    /// Read and parse a raw BTF file (not an ELF `.BTF` section).
    pub fn from_path(path: &Path) -> Result<Btf, BtfError> {
        let bytes = std::fs::read(path).map_err(|source| {
            let path = path.display().to_string();
            if source.kind() == io::ErrorKind::NotFound {
                BtfError::NotFound { path }
            } else {
                BtfError::Io { path, source }
            }
        })?;
        Self::parse(&bytes)
    }

    /// Parse a raw BTF blob. Never panics; malformed input is an error.
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        if bytes.len() < HEADER_MIN_LEN {
            return Err(malformed(format!(
                "{} bytes is too short for a BTF header ({HEADER_MIN_LEN} bytes)",
                bytes.len()
            )));
        }
        // The magic is written in the producer's byte order.
        let big_endian = match u16::from_le_bytes([bytes[0], bytes[1]]) {
            BTF_MAGIC => false,
            m if m.swap_bytes() == BTF_MAGIC => true,
            m => return Err(malformed(format!("bad magic {m:#06x}, expected 0xeb9f"))),
        };
        let version = bytes[2];
        if version != 1 {
            return Err(malformed(format!("unsupported BTF version {version}")));
        }
        let r = Reader {
            data: bytes,
            big_endian,
        };
        let field = |off: usize| r.u32(off).map(|v| v as usize);
        let (Some(hdr_len), Some(type_off), Some(type_len), Some(str_off), Some(str_len)) =
            (field(4), field(8), field(12), field(16), field(20))
        else {
            return Err(malformed("truncated header"));
        };
        if hdr_len < HEADER_MIN_LEN || hdr_len > bytes.len() {
            return Err(malformed(format!(
                "header length {hdr_len} is outside {HEADER_MIN_LEN}..={}",
                bytes.len()
            )));
        }
        let section = |what: &str, off: usize, len: usize| -> Result<Range<usize>, BtfError> {
            let start = hdr_len.checked_add(off);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() => Ok(start..end),
                _ => Err(malformed(format!(
                    "{what} section (offset {off}, length {len}) runs past the end of the \
                     {}-byte blob",
                    bytes.len()
                ))),
            }
        };
        let type_range = section("type", type_off, type_len)?;
        let str_range = section("string", str_off, str_len)?;
        let strings = bytes[str_range].to_vec();
        if strings.first().is_some_and(|&b| b != 0) {
            return Err(malformed(
                "string section does not start with an empty string",
            ));
        }
        if strings.last().is_some_and(|&b| b != 0) {
            return Err(malformed("string section does not end with a NUL"));
        }

        let mut btf = Btf {
            types: Vec::new(),
            members: Vec::new(),
            strings,
            by_name: HashMap::new(),
        };
        let types = Reader {
            data: &bytes[type_range],
            big_endian,
        };
        let mut pos = 0usize;
        while pos < types.data.len() {
            let id = u32::try_from(btf.types.len() + 1)
                .map_err(|_| malformed("more than 2^32 types"))?;
            let truncated = || {
                malformed(format!(
                    "type id {id} (at byte {pos} of the type section) is truncated"
                ))
            };
            let (Some(name_off), Some(info), Some(size_or_type)) =
                (types.u32(pos), types.u32(pos + 4), types.u32(pos + 8))
            else {
                return Err(truncated());
            };
            let vlen = (info & 0xffff) as usize;
            let kind = ((info >> 24) & 0x1f) as u8;
            let kind_flag = info >> 31 == 1;
            btf.check_name(name_off, id)?;
            let body = pos + TYPE_LEN;
            let extra = match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                KIND_ARRAY => 12,
                KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                KIND_PTR | KIND_FWD | KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT
                | KIND_FUNC | KIND_FLOAT | KIND_TYPE_TAG => 0,
                _ => return Err(BtfError::UnknownKind { kind, id }),
            };
            let next = body + extra;
            if next > types.data.len() {
                return Err(truncated());
            }
            let first_member = btf.members.len();
            if kind == KIND_STRUCT || kind == KIND_UNION {
                btf.members.reserve(vlen);
                for i in 0..vlen {
                    let m = body + 12 * i;
                    let (Some(m_name), Some(m_type), Some(m_off)) =
                        (types.u32(m), types.u32(m + 4), types.u32(m + 8))
                    else {
                        return Err(truncated());
                    };
                    btf.check_name(m_name, id)?;
                    let (bit_offset, bitfield_size) = if kind_flag {
                        (m_off & 0x00ff_ffff, m_off >> 24)
                    } else {
                        (m_off, 0)
                    };
                    btf.members.push(Member {
                        name_off: m_name,
                        type_id: m_type,
                        bit_offset,
                        bitfield_size,
                    });
                }
            }
            btf.types.push(Type {
                kind,
                size_or_type,
                members: first_member..btf.members.len(),
            });
            if (kind == KIND_STRUCT || kind == KIND_UNION) && name_off != 0 {
                let name = btf.name(name_off).to_vec();
                btf.by_name.entry(name).or_insert(id);
            }
            pos = next;
        }
        Ok(btf)
    }

    /// Number of types (ids `1..=len`).
    pub fn len(&self) -> usize {
        self.types.len()
    }

    /// True when the blob declared no types at all.
    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// Size in bytes of the struct or union called `name`.
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        let id = self.struct_id(name)?;
        Ok(self.ty(id)?.size_or_type)
    }

    /// Byte offset of `struct_name.path[0].path[1]...`.
    ///
    /// Member types are followed through typedef/const/volatile/restrict/
    /// type tags, and members of anonymous structs/unions are found as if
    /// they were direct members (as C does). Bitfields are an error.
    pub fn member_offset(&self, struct_name: &str, path: &[&str]) -> Result<u32, BtfError> {
        let mut type_id = self.struct_id(struct_name)?;
        let mut bits: u64 = 0;
        let mut shown = struct_name.to_string();
        for &member in path {
            let id = self.skip_modifiers(type_id)?;
            let ty = self.ty(id)?;
            if ty.kind != KIND_STRUCT && ty.kind != KIND_UNION {
                return Err(BtfError::NotAStruct {
                    path: shown,
                    member: member.to_string(),
                });
            }
            let mut searched = HashSet::new();
            let Some((m, m_bits)) = self.find_member(id, member.as_bytes(), 0, &mut searched)?
            else {
                return Err(BtfError::MemberNotFound {
                    path: shown,
                    member: member.to_string(),
                });
            };
            shown.push('.');
            shown.push_str(member);
            if m.bitfield_size != 0 || m_bits % 8 != 0 {
                return Err(BtfError::NotByteAligned {
                    path: shown,
                    bit_offset: bits + m_bits,
                });
            }
            bits += m_bits;
            type_id = m.type_id;
        }
        let bytes = bits / 8;
        u32::try_from(bytes).map_err(|_| BtfError::TooLarge { path: shown, bytes })
    }

    /// Look for `name` among the members of struct/union `id`, descending
    /// into anonymous struct/union members. Returns the member and its bit
    /// offset from the start of `id`.
    ///
    /// `searched` holds the types already searched in vain for `name`: they
    /// are not searched again, so types shared by several anonymous members
    /// cost one search each, not one per path (2^depth paths otherwise).
    fn find_member(
        &self,
        id: u32,
        name: &[u8],
        depth: usize,
        searched: &mut HashSet<u32>,
    ) -> Result<Option<(Member, u64)>, BtfError> {
        if searched.contains(&id) {
            return Ok(None);
        }
        if depth > MAX_ANON_DEPTH {
            return Err(malformed(format!(
                "anonymous members nested more than {MAX_ANON_DEPTH} deep (type id {id})"
            )));
        }
        let ty = self.ty(id)?;
        // Direct members first: a named member wins over one inside an
        // anonymous member (C would reject the duplicate anyway).
        let members = &self.members[ty.members.clone()];
        if let Some(m) = members
            .iter()
            .find(|m| m.name_off != 0 && self.name(m.name_off) == name)
        {
            return Ok(Some((*m, u64::from(m.bit_offset))));
        }
        for m in members.iter().filter(|m| self.name(m.name_off).is_empty()) {
            let inner = self.skip_modifiers(m.type_id)?;
            let inner_kind = self.ty(inner)?.kind;
            if inner_kind != KIND_STRUCT && inner_kind != KIND_UNION {
                continue; // e.g. an unnamed bitfield used as padding
            }
            if let Some((found, off)) = self.find_member(inner, name, depth + 1, searched)? {
                return Ok(Some((found, u64::from(m.bit_offset) + off)));
            }
        }
        searched.insert(id);
        Ok(None)
    }

    /// Follow typedef/const/volatile/restrict/type_tag to the real type.
    fn skip_modifiers(&self, mut id: u32) -> Result<u32, BtfError> {
        for _ in 0..MAX_MODIFIER_CHAIN {
            let ty = self.ty(id)?;
            match ty.kind {
                KIND_TYPEDEF | KIND_CONST | KIND_VOLATILE | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = ty.size_or_type;
                }
                _ => return Ok(id),
            }
        }
        Err(malformed(format!(
            "typedef/modifier chain longer than {MAX_MODIFIER_CHAIN} at type id {id}"
        )))
    }

    fn struct_id(&self, name: &str) -> Result<u32, BtfError> {
        self.by_name
            .get(name.as_bytes())
            .copied()
            .ok_or_else(|| BtfError::StructNotFound(name.to_string()))
    }

    fn ty(&self, id: u32) -> Result<&Type, BtfError> {
        if id == 0 {
            return Err(malformed(
                "reference to type id 0 (void) where a type was expected",
            ));
        }
        self.types.get(id as usize - 1).ok_or_else(|| {
            malformed(format!(
                "reference to type id {id}, but there are only {} types",
                self.types.len()
            ))
        })
    }

    /// Ensure `off` names a string inside the string section (which `parse`
    /// has checked ends with a NUL, so every such string is terminated).
    fn check_name(&self, off: u32, id: u32) -> Result<(), BtfError> {
        if (off as usize) < self.strings.len() || off == 0 {
            Ok(())
        } else {
            Err(malformed(format!(
                "type id {id} has name offset {off} outside the {}-byte string section",
                self.strings.len()
            )))
        }
    }

    /// The string at `off` (without its NUL); empty if out of range, which
    /// `parse` has already ruled out for every stored offset.
    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        &rest[..end]
    }
}

/// Offset of `thread.fsbase` in the running kernel's `task_struct`: where a
/// thread's `%fs` base (its TLS pointer) is saved. x86-64 only.
pub fn task_fsbase_offset(btf: &Btf) -> Result<u64, BtfError> {
    Ok(u64::from(
        btf.member_offset("task_struct", &["thread", "fsbase"])?,
    ))
}

/// Offset of `task_struct.mm`: NULL once an exiting thread has left its
/// address space, where no user memory can be read.
pub fn task_mm_offset(btf: &Btf) -> Result<u64, BtfError> {
    Ok(u64::from(btf.member_offset("task_struct", &["mm"])?))
}

/// Offsets of `task_struct.signal` and of `signal_struct.live.counter`: the
/// exit program tells the last thread of a process by `signal->live`.
pub fn group_live_offsets(btf: &Btf) -> Result<(u64, u64), BtfError> {
    let signal = btf.member_offset("task_struct", &["signal"])?;
    let live = btf.member_offset("signal_struct", &["live", "counter"])?;
    Ok((u64::from(signal), u64::from(live)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds little-endian BTF blobs by hand.
    struct Builder {
        types: Vec<u8>,
        strings: Vec<u8>,
        next_id: u32,
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        fn words(&mut self, words: &[u32]) {
            for w in words {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
        }

        /// Adds a type header plus `extra` u32 words; returns its id.
        fn ty(
            &mut self,
            name: &str,
            kind: u8,
            kind_flag: bool,
            vlen: u32,
            st: u32,
            extra: &[u32],
        ) -> u32 {
            let name = self.str(name);
            let info = (u32::from(kind_flag) << 31) | (u32::from(kind) << 24) | vlen;
            self.words(&[name, info, st]);
            self.words(extra);
            let id = self.next_id;
            self.next_id += 1;
            id
        }

        /// struct/union with (name, type, bit offset[, bitfield size]) members.
        fn composite(
            &mut self,
            kind: u8,
            name: &str,
            size: u32,
            members: &[(&str, u32, u32, u32)],
        ) -> u32 {
            let kind_flag = members.iter().any(|m| m.3 != 0);
            let mut extra = Vec::new();
            for &(n, t, off, bits) in members {
                let off = if kind_flag { (bits << 24) | off } else { off };
                extra.extend_from_slice(&[self.str(n), t, off]);
            }
            self.ty(name, kind, kind_flag, members.len() as u32, size, &extra)
        }

        fn finish(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.extend_from_slice(&[1, 0]);
            for w in [
                24,
                0,
                self.types.len() as u32,
                self.types.len() as u32,
                self.strings.len() as u32,
            ] {
                out.extend_from_slice(&w.to_le_bytes());
            }
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// A blob with every kind, so each kind's trailing data must be skipped
    /// correctly for the later structs to parse:
    ///
    /// ```c
    /// struct inner { char x; int y; };                    // size 8
    /// typedef const struct inner inner_t;
    /// struct outer {                                      // size 48
    ///     int a;                                          // 0
    ///     union {                                         // 8
    ///         int b;                                      // 8
    ///         struct { long c; volatile inner_t d; };     // 8, 16
    ///     };
    ///     unsigned flag : 3, mode : 5;                    // bits 192, 195
    ///     inner_t e;                                      // 32
    ///     int *p;                                         // 40
    /// };
    /// ```
    fn sample() -> Vec<u8> {
        let mut b = Builder::new();
        let int = b.ty("int", KIND_INT, false, 0, 4, &[(1 << 24) | 32]); // 1
        let long = b.ty("long", KIND_INT, false, 0, 8, &[(1 << 24) | 64]); // 2
        let char_ = b.ty("char", KIND_INT, false, 0, 1, &[8]); // 3
        let ptr = b.ty("", KIND_PTR, false, 0, int, &[]); // 4
        b.ty("", KIND_ARRAY, false, 0, 0, &[char_, int, 16]); // 5
        let red = b.str("RED");
        b.ty("color", KIND_ENUM, false, 3, 4, &[red, 0, 0, 1, 0, 2]); // 6
        b.ty("fwd", KIND_FWD, false, 0, 0, &[]); // 7
        b.ty("", KIND_FUNC_PROTO, false, 2, int, &[0, int, 0, ptr]); // 8
        b.ty("f", KIND_FUNC, false, 0, 8, &[]); // 9
        b.ty("v", KIND_VAR, false, 0, int, &[1]); // 10
        b.ty(".data", KIND_DATASEC, false, 1, 4, &[10, 0, 4]); // 11
        b.ty("double", KIND_FLOAT, false, 0, 8, &[]); // 12
        b.ty("tag", KIND_DECL_TAG, false, 0, 10, &[u32::MAX]); // 13
        b.ty("tt", KIND_TYPE_TAG, false, 0, ptr, &[]); // 14
        b.ty("big", KIND_ENUM64, false, 2, 8, &[0, 1, 0, 0, 2, 0]); // 15
        b.ty("", KIND_RESTRICT, false, 0, ptr, &[]); // 16
        let inner = b.composite(
            KIND_STRUCT,
            "inner",
            8,
            &[("x", char_, 0, 0), ("y", int, 32, 0)],
        );
        let c_inner = b.ty("", KIND_CONST, false, 0, inner, &[]);
        let inner_t = b.ty("inner_t", KIND_TYPEDEF, false, 0, c_inner, &[]);
        let v_inner_t = b.ty("", KIND_VOLATILE, false, 0, inner_t, &[]);
        let anon_s = b.composite(
            KIND_STRUCT,
            "",
            16,
            &[("c", long, 0, 0), ("d", v_inner_t, 64, 0)],
        );
        let anon_u = b.composite(KIND_UNION, "", 16, &[("b", int, 0, 0), ("", anon_s, 0, 0)]);
        b.composite(
            KIND_STRUCT,
            "outer",
            48,
            &[
                ("a", int, 0, 0),
                ("", anon_u, 64, 0),
                ("flag", int, 192, 3),
                ("mode", int, 195, 5),
                ("e", inner_t, 256, 0),
                ("p", ptr, 320, 0),
            ],
        );
        b.finish()
    }

    #[test]
    fn hand_built_blob_offsets() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(btf.len(), 23);
        assert_eq!(btf.struct_size("outer").unwrap(), 48);
        assert_eq!(btf.struct_size("inner").unwrap(), 8);
        assert_eq!(btf.member_offset("outer", &[]).unwrap(), 0);
        assert_eq!(btf.member_offset("outer", &["a"]).unwrap(), 0);
        // Through the anonymous union, and the anonymous struct inside it.
        assert_eq!(btf.member_offset("outer", &["b"]).unwrap(), 8);
        assert_eq!(btf.member_offset("outer", &["c"]).unwrap(), 8);
        assert_eq!(btf.member_offset("outer", &["d"]).unwrap(), 16);
        // volatile -> typedef -> const -> struct inner.
        assert_eq!(btf.member_offset("outer", &["d", "y"]).unwrap(), 20);
        assert_eq!(btf.member_offset("outer", &["e"]).unwrap(), 32);
        assert_eq!(btf.member_offset("outer", &["e", "x"]).unwrap(), 32);
        assert_eq!(btf.member_offset("outer", &["e", "y"]).unwrap(), 36);
        assert_eq!(btf.member_offset("outer", &["p"]).unwrap(), 40);
        assert_eq!(btf.member_offset("inner", &["y"]).unwrap(), 4);
    }

    #[test]
    fn hand_built_blob_errors() {
        let btf = Btf::parse(&sample()).unwrap();
        let err = |r: Result<u32, BtfError>| r.unwrap_err().to_string();
        assert_eq!(
            err(btf.member_offset("nope", &["a"])),
            "no struct or union named `nope` in BTF"
        );
        assert_eq!(
            err(btf.member_offset("outer", &["zz"])),
            "`outer` has no member `zz`"
        );
        assert_eq!(
            err(btf.member_offset("outer", &["e", "zz"])),
            "`outer.e` has no member `zz`"
        );
        assert_eq!(
            err(btf.member_offset("outer", &["a", "x"])),
            "`outer.a` is not a struct or union, so it has no member `x`"
        );
        // Pointers are not followed: the member is not inside this struct.
        assert!(matches!(
            btf.member_offset("outer", &["p", "x"]),
            Err(BtfError::NotAStruct { .. })
        ));
        // Bitfields (kind_flag: bit offset in the low 24 bits, size in the high 8).
        assert_eq!(
            err(btf.member_offset("outer", &["mode"])),
            "`outer.mode` is a bitfield or not byte-aligned (bit offset 195)"
        );
        assert!(matches!(
            btf.member_offset("outer", &["flag"]),
            Err(BtfError::NotByteAligned {
                bit_offset: 192,
                ..
            })
        ));
        // Enums, typedefs and anonymous types are not looked up as structs.
        assert!(btf.struct_size("color").is_err());
        assert!(btf.struct_size("inner_t").is_err());
        assert!(btf.struct_size("").is_err());
    }

    #[test]
    fn truncated_blobs_are_errors() {
        let blob = sample();
        for len in 0..blob.len() {
            assert!(
                Btf::parse(&blob[..len]).is_err(),
                "prefix of {len} bytes parsed"
            );
        }
        // A type section declared 4 bytes short cuts the last member in half.
        let mut short = blob.clone();
        let type_len = u32::from_le_bytes(short[12..16].try_into().unwrap());
        short[12..16].copy_from_slice(&(type_len - 4).to_le_bytes());
        let err = Btf::parse(&short).unwrap_err().to_string();
        assert_eq!(
            err,
            "malformed BTF: type id 23 (at byte 444 of the type section) is truncated"
        );
    }

    #[test]
    fn garbage_never_panics() {
        let blob = sample();
        // Every single-byte corruption, with a few values each.
        for i in 0..blob.len() {
            for v in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut b = blob.clone();
                b[i] = v;
                if let Ok(btf) = Btf::parse(&b) {
                    exercise(&btf);
                }
            }
        }
        // Pseudo-random bytes behind a valid header prefix.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            let len = 24 + round % 200;
            let mut b: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            b[0..4].copy_from_slice(&[0x9f, 0xeb, 1, 0]);
            if round % 2 == 0 {
                b[4..8].copy_from_slice(&24u32.to_le_bytes());
            }
            if let Ok(btf) = Btf::parse(&b) {
                exercise(&btf);
            }
        }
        fn exercise(btf: &Btf) {
            for name in ["outer", "inner", ""] {
                let _ = btf.struct_size(name);
                for path in [&["a"][..], &["d", "y"], &["e", "x"], &["b"], &["zz", "zz"]] {
                    let _ = btf.member_offset(name, path);
                }
            }
        }
    }

    #[test]
    fn header_errors_are_clear() {
        let msg = |b: &[u8]| Btf::parse(b).unwrap_err().to_string();
        assert_eq!(
            msg(b""),
            "malformed BTF: 0 bytes is too short for a BTF header (24 bytes)"
        );
        assert_eq!(
            msg(&[0u8; 32]),
            "malformed BTF: bad magic 0x0000, expected 0xeb9f"
        );
        let mut blob = sample();
        blob[2] = 2;
        assert_eq!(msg(&blob), "malformed BTF: unsupported BTF version 2");
        let mut blob = sample();
        blob[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(msg(&blob).starts_with("malformed BTF: header length"));
        let mut blob = sample();
        blob[16..20].copy_from_slice(&u32::MAX.to_le_bytes()); // str_off
        assert!(msg(&blob).contains("string section"));
        let mut blob = sample();
        *blob.last_mut().unwrap() = b'x';
        assert_eq!(
            msg(&blob),
            "malformed BTF: string section does not end with a NUL"
        );
        let mut blob = sample();
        blob[24..28].copy_from_slice(&100_000u32.to_le_bytes()); // type 1's name_off
        assert!(msg(&blob).contains("type id 1 has name offset 100000 outside"));
        // An unknown kind cannot be skipped, so it is an error, not a guess.
        let mut b = Builder::new();
        b.ty("x", 31, false, 0, 0, &[]);
        assert_eq!(
            msg(&b.finish()),
            "unsupported BTF kind 31 (type id 1); this parser knows kinds 1..=19"
        );
        // Member referencing a missing type errors on lookup, not on parse.
        let mut b = Builder::new();
        b.composite(KIND_STRUCT, "s", 8, &[("m", 99, 0, 0)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        assert!(btf.member_offset("s", &["m"]).is_ok());
        assert!(btf
            .member_offset("s", &["m", "x"])
            .unwrap_err()
            .to_string()
            .contains("type id 99"));
        // A typedef loop is detected.
        let mut b = Builder::new();
        b.ty("loop", KIND_TYPEDEF, false, 0, 2, &[]);
        b.ty("loop2", KIND_TYPEDEF, false, 0, 1, &[]);
        b.composite(KIND_STRUCT, "s", 8, &[("m", 1, 0, 0)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        assert!(btf
            .member_offset("s", &["m", "x"])
            .unwrap_err()
            .to_string()
            .contains("chain"));
        // Self-containing anonymous member is bounded.
        let mut b = Builder::new();
        b.composite(KIND_STRUCT, "s", 8, &[("", 1, 0, 0)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        assert!(btf
            .member_offset("s", &["x"])
            .unwrap_err()
            .to_string()
            .contains("nested"));
    }

    #[test]
    fn big_endian_blob() {
        // Byte-swap every u32 of the sample (header fields, types, but not
        // the string section) and the magic.
        let le = sample();
        let str_start = 24 + u32::from_le_bytes(le[16..20].try_into().unwrap()) as usize;
        let mut be = le.clone();
        be[0..2].copy_from_slice(&BTF_MAGIC.to_be_bytes());
        for chunk in be[4..str_start].chunks_exact_mut(4) {
            chunk.reverse();
        }
        let btf = Btf::parse(&be).unwrap();
        assert_eq!(btf.member_offset("outer", &["d", "y"]).unwrap(), 20);
    }

    fn kernel() -> Btf {
        Btf::from_sys_fs().expect("this test needs the running kernel's BTF")
    }

    #[test]
    fn kernel_task_struct() {
        let btf = kernel();
        assert!(btf.len() > 10_000, "only {} types", btf.len());
        let task_size = btf.struct_size("task_struct").unwrap();
        let fsbase = task_fsbase_offset(&btf).unwrap();
        assert_eq!(fsbase % 8, 0, "fsbase offset {fsbase} not 8-aligned");
        assert!(
            fsbase < u64::from(task_size),
            "fsbase {fsbase} >= sizeof(task_struct) {task_size}"
        );
        // fsbase is inside `thread`, which the kernel keeps as the last member.
        let thread = btf.member_offset("task_struct", &["thread"]).unwrap();
        let thread_size = btf.struct_size("thread_struct").unwrap();
        let in_thread = btf.member_offset("thread_struct", &["fsbase"]).unwrap();
        assert_eq!(fsbase, u64::from(thread + in_thread));
        assert!(thread + thread_size <= task_size);
        // `pid_t pid; pid_t tgid;` are adjacent.
        let pid = btf.member_offset("task_struct", &["pid"]).unwrap();
        let tgid = btf.member_offset("task_struct", &["tgid"]).unwrap();
        assert_eq!(tgid, pid + 4);
        assert!(pid > 0 && pid < task_size);
        // Layouts fixed by the C ABI.
        assert_eq!(btf.member_offset("list_head", &["next"]).unwrap(), 0);
        assert_eq!(btf.member_offset("list_head", &["prev"]).unwrap(), 8);
        assert_eq!(btf.struct_size("list_head").unwrap(), 16);
        eprintln!(
            "task_struct: size {task_size}, pid at {pid}, thread at {thread}, fsbase at {fsbase}"
        );
    }

    #[test]
    fn kernel_signal_live() {
        let btf = kernel();
        let (signal, live) = group_live_offsets(&btf).unwrap();
        assert_eq!(signal % 8, 0, "task_struct.signal is a pointer");
        assert_eq!(live % 4, 0, "signal_struct.live is an atomic_t");
        assert!(signal > 0 && signal < u64::from(btf.struct_size("task_struct").unwrap()));
        assert!(live < u64::from(btf.struct_size("signal_struct").unwrap()));
        // What the exit program relies on to reject a bad offset: none is 0.
        assert!(live > 0, "signal_struct starts with `sigcnt`, not `live`");
    }

    #[test]
    fn kernel_anonymous_members() {
        // `struct page` is mostly anonymous unions of anonymous structs;
        // `flags` is first, and `lru` lives inside them at offset 8.
        let btf = kernel();
        assert_eq!(btf.member_offset("page", &["flags"]).unwrap(), 0);
        assert_eq!(btf.member_offset("page", &["lru"]).unwrap(), 8);
        assert_eq!(btf.member_offset("page", &["lru", "prev"]).unwrap(), 16);
    }

    /// Found while writing the BTF fuzz target: anonymous members that share
    /// their types (a DAG, not a loop) made the search for a missing member
    /// visit every path, 2^depth of them: 30 levels of two members each hung
    /// the daemon's start.
    #[test]
    fn shared_anonymous_members_are_searched_once() {
        const LEVELS: u32 = 30;
        let mut b = Builder::new();
        let int = b.ty("int", KIND_INT, false, 0, 4, &[(1 << 24) | 32]);
        // Level i (type id int + 1 + i) has two anonymous members of level i + 1.
        for level in 0..LEVELS {
            let next = int + 2 + level;
            let name = if level == 0 { "top" } else { "" };
            b.composite(KIND_STRUCT, name, 8, &[("", next, 0, 0), ("", next, 32, 0)]);
        }
        b.composite(KIND_STRUCT, "", 4, &[("leaf", int, 0, 0)]);
        let btf = Btf::parse(&b.finish()).unwrap();
        let start = std::time::Instant::now();
        assert!(matches!(
            btf.member_offset("top", &["missing"]),
            Err(BtfError::MemberNotFound { .. })
        ));
        assert_eq!(btf.member_offset("top", &["leaf"]).unwrap(), 0);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn missing_file_message() {
        let err = Btf::from_path(Path::new("/nonexistent/btf/vmlinux")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF not found at /nonexistent/btf/vmlinux (kernel built without \
             CONFIG_DEBUG_INFO_BTF)"
        );
    }
}
