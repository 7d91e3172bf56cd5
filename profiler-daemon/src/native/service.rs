//! Native frames of samples: user stacks unwound and addresses named on a
//! thread of its own, because blazesym's symbolizer is not `Send` while the
//! store that asks is shared. One request per batch of samples or of new
//! stacks, never per sample.
//!
//! The thread starts at the first request, so a process that drops its
//! capabilities while it has one thread can create a service before.
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use super::stacks::{NativeLimits, NativeStacks, NativeStats};
use super::unwind::{NativeFrame, StopReason, UserRegs, UserStack};
use super::user::{NativeSymbol, Symbol, Unsymbolised};
use crate::bpf::events::RawSample;
use crate::profile::Frame;
use profiler_common::ENTRY_MARK_INSTR;

/// A sample's native stack as unwound: what the store keys it by.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NativeWalk {
    /// Addresses to name, leaf first: the leaf's instruction, then each
    /// caller's call instruction (its return address minus one).
    pub lookups: Box<[u64]>,
    /// Frames (indices, leaf first) that are eval-loop activations by the
    /// stack address of their boundary frame (3.12+): found even where the
    /// eval loop has no name.
    pub activations: Box<[u16]>,
    /// The unwind reached the outermost frame.
    pub complete: bool,
}

/// A copied user stack to unwind.
struct Copied {
    pid: u32,
    regs: UserRegs,
    stack: Vec<u8>,
    /// Addresses of the sample's boundary frames (its entry marks').
    anchors: Vec<u64>,
}

/// What the service thread is asked.
enum Request {
    /// Name each (pid, address).
    Name {
        lookups: Vec<(u32, u64)>,
        reply: SyncSender<Vec<Arc<NativeSymbol>>>,
    },
    Unwind {
        stacks: Vec<Copied>,
        reply: SyncSender<Vec<NativeWalk>>,
    },
    /// Forget what is kept of a pid (its process was replaced or ended).
    Forget(u32),
    Stats(SyncSender<NativeStats>),
}

/// Unwinds and names native frames; cheap to share (`Arc`) between threads.
pub struct NativeService {
    limits: NativeLimits,
    tx: Mutex<Option<Sender<Request>>>,
}

impl std::fmt::Debug for NativeService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeService").finish_non_exhaustive()
    }
}

/// Where the service thread failed: every address it should have named
/// says so.
const FAILED: &str = "[native symbolizer failed]";

impl NativeService {
    pub fn new(limits: NativeLimits) -> Arc<NativeService> {
        Arc::new(NativeService {
            limits,
            tx: Mutex::new(None),
        })
    }

    /// The service thread's sender, started on first use.
    fn sender(&self) -> Option<Sender<Request>> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_none() {
            let (s, r) = mpsc::channel();
            let limits = self.limits;
            let spawned = std::thread::Builder::new()
                .name("native-frames".into())
                .spawn(move || serve(NativeStacks::new(limits), r));
            match spawned {
                Ok(_) => *tx = Some(s),
                Err(e) => {
                    tracing::warn!("cannot start the native symbolizer thread: {e}");
                    return None;
                }
            }
        }
        tx.clone()
    }

    /// Sends a request made with a reply channel and waits for the answer.
    fn ask<T>(&self, make: impl FnOnce(SyncSender<T>) -> Request) -> Option<T> {
        let tx = self.sender()?;
        let (reply, answer) = mpsc::sync_channel(1);
        tx.send(make(reply)).ok()?;
        answer.recv().ok()
    }

    /// The symbol of each (pid, address), in order.
    pub fn name(&self, lookups: Vec<(u32, u64)>) -> Vec<Arc<NativeSymbol>> {
        let n = lookups.len();
        match self.ask(|reply| Request::Name { lookups, reply }) {
            Some(v) if v.len() == n => v,
            _ => {
                let failed = Arc::new(unnamed_symbol(FAILED));
                std::iter::repeat_n(failed, n).collect()
            }
        }
    }

    /// `samples`, each user stack copied with one (taken out of it)
    /// unwound into its `native` walk by `service`, if there is one: what
    /// every ingest path does before it locks the store.
    pub fn unwound(
        service: Option<&NativeService>,
        samples: impl IntoIterator<Item = RawSample>,
    ) -> Vec<RawSample> {
        let mut samples: Vec<RawSample> = samples.into_iter().collect();
        if let Some(s) = service {
            s.unwind_samples(&mut samples);
        }
        samples
    }

    /// Unwinds the user stack copied with each sample (taken out of it)
    /// into its `native` walk. Samples without a copy are left as they are.
    pub fn unwind_samples(&self, samples: &mut [RawSample]) {
        let mut at = Vec::new();
        let mut stacks = Vec::new();
        for (i, s) in samples.iter_mut().enumerate() {
            if let (Some(stack), Some(r)) = (s.user_stack.take(), s.regs) {
                at.push(i);
                let anchors = s
                    .frames
                    .iter()
                    .filter(|f| f.instr == ENTRY_MARK_INSTR && f.code != 0)
                    .map(|f| f.code)
                    .collect();
                stacks.push(Copied {
                    anchors,
                    pid: s.pid,
                    regs: UserRegs {
                        ip: r.ip,
                        sp: r.sp,
                        bp: Some(r.bp),
                    },
                    stack,
                });
            }
        }
        if stacks.is_empty() {
            return;
        }
        let n = stacks.len();
        let walks = match self.ask(|reply| Request::Unwind { stacks, reply }) {
            Some(v) if v.len() == n => v,
            // No walk: the samples keep their native leaf only.
            _ => return,
        };
        for (i, w) in at.into_iter().zip(walks) {
            samples[i].native = Some(w);
        }
    }

    /// Drops what is kept for `pid`.
    pub fn forget_pid(&self, pid: u32) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(Request::Forget(pid));
        }
    }

    /// The service thread's counters (zero before it started).
    pub fn stats(&self) -> NativeStats {
        if self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return NativeStats::default();
        }
        self.ask(Request::Stats).unwrap_or_default()
    }
}

/// The service thread: until every sender is gone.
fn serve(mut stacks: NativeStacks, requests: Receiver<Request>) {
    for r in requests {
        match r {
            Request::Name { lookups, reply } => {
                let symbols = lookups
                    .iter()
                    .map(|&(pid, addr)| symbol(&mut stacks, pid, addr))
                    .collect();
                let _ = reply.send(symbols);
            }
            Request::Unwind {
                stacks: copies,
                reply,
            } => {
                let walks = copies.iter().map(|c| walk(&mut stacks, c)).collect();
                let _ = reply.send(walks);
            }
            Request::Forget(pid) => stacks.forget_pid(pid),
            Request::Stats(reply) => {
                let _ = reply.send(stacks.stats());
            }
        }
    }
}

/// The symbol at `addr` of `pid`. A process whose mappings can no longer be
/// read (it exited) gives a symbol that says so.
fn symbol(stacks: &mut NativeStacks, pid: u32, addr: u64) -> Arc<NativeSymbol> {
    match stacks.symbolise(pid, &[addr]) {
        Ok(mut s) => s.pop().unwrap_or_else(|| Arc::new(unnamed_symbol(FAILED))),
        Err(_) => Arc::new(unnamed_symbol("[process gone]")),
    }
}

/// The copied stack `c` unwound; an exited process gives an empty walk.
fn walk(stacks: &mut NativeStacks, c: &Copied) -> NativeWalk {
    let stack = UserStack {
        regs: c.regs,
        stack: &c.stack,
    };
    match stacks.unwind(c.pid, &stack) {
        Ok(u) => NativeWalk {
            lookups: u.frames.iter().map(|f| f.lookup_address()).collect(),
            activations: activations(&u.frames, &c.anchors, c.regs.sp + c.stack.len() as u64),
            complete: u.stop == StopReason::Outermost,
        },
        Err(_) => NativeWalk {
            lookups: Box::new([]),
            activations: Box::new([]),
            complete: false,
        },
    }
}

/// The frames (leaf first) whose part of the stack, from their `sp` to the
/// next older frame's (for the oldest, to `top`, the end of the copy),
/// holds one of `anchors`: each boundary frame lives in the C frame of the
/// eval-loop activation that pushed it. Anchors off the copied stack (3.15
/// keeps its base frame in the thread state) mark nothing.
fn activations(frames: &[NativeFrame], anchors: &[u64], top: u64) -> Box<[u16]> {
    let mut out: Vec<u16> = anchors
        .iter()
        .filter(|&&a| frames.first().is_some_and(|f| f.sp <= a) && a < top)
        .filter_map(|&a| {
            let i = frames.partition_point(|f| f.sp <= a).checked_sub(1)?;
            u16::try_from(i).ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out.into()
}

/// A symbol that only says where it comes from.
fn unnamed_symbol(module: &str) -> NativeSymbol {
    NativeSymbol {
        module: module.into(),
        module_offset: 0,
        symbol: Symbol::Unsymbolised(Unsymbolised::NotMapped),
    }
}

/// The frame of a native symbol: its function, or `??` in its module when
/// the module has no symbol for it.
pub fn frame(symbol: &NativeSymbol) -> Frame {
    match &symbol.symbol {
        Symbol::Function { name, source, .. } => Frame::Native {
            function: Some(name.clone()),
            module: symbol.module.clone(),
            source: source.clone(),
        },
        // `[unmapped]`, `[process gone]`, or the file without a symbol.
        Symbol::Unsymbolised(_) => Frame::Native {
            function: None,
            module: symbol.module.clone(),
            source: None,
        },
    }
}

/// The frame of a native leaf; `None` in the eval loop, which the Python
/// frames stand for.
pub fn leaf_frame(symbol: &NativeSymbol) -> Option<Frame> {
    (!symbol.is_eval_loop()).then(|| frame(symbol))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn native(f: Frame) -> (Option<String>, String) {
        match f {
            Frame::Native {
                function, module, ..
            } => (function.map(|f| f.to_string()), module.to_string()),
            other => panic!("{other:?}"),
        }
    }

    /// The leaf of this very thread's code: a function of this test binary
    /// is named; an address in no mapping says so; a pid that does not exist
    /// says the process is gone.
    #[test]
    fn names_addresses_of_a_live_process() {
        let service = NativeService::new(NativeLimits::default());
        let pid = std::process::id();
        let here = names_addresses_of_a_live_process as fn() as usize as u64;
        let got = service.name(vec![(pid, here), (pid, 8), (u32::MAX - 1, here)]);
        let (f, _) = native(frame(&got[0]));
        let f = f.expect("a name");
        assert!(f.contains("names_addresses_of_a_live_process"), "{f}");
        assert_eq!(native(frame(&got[1])), (None, "[unmapped]".into()));
        assert_eq!(native(frame(&got[2])), (None, "[process gone]".into()));
        assert!(service.stats().maps_reads >= 1);
    }

    /// Each anchor marks the frame whose stack range holds it; anchors
    /// below the leaf or past the copy mark nothing.
    #[test]
    fn activations_by_stack_address() {
        use super::super::unwind::FrameSource;
        let f = |sp| NativeFrame {
            address: 0x1000,
            source: FrameSource::Cfi,
            sp,
        };
        let frames = [f(100), f(200), f(300), f(400)];
        assert_eq!(&*activations(&frames, &[250, 120, 260], 1000), &[0, 1]);
        assert_eq!(&*activations(&frames, &[450, 999], 1000), &[3]);
        assert!(activations(&frames, &[50, 1000, 5000], 1000).is_empty());
        assert!(activations(&[], &[150], 1000).is_empty());
    }

    #[test]
    fn the_eval_loop_is_no_leaf() {
        let s = NativeSymbol {
            module: "libpython3.11.so.1.0".into(),
            module_offset: 0x1000,
            symbol: Symbol::Function {
                name: super::super::user::EVAL_LOOP.into(),
                offset: 12,
                source: None,
            },
        };
        assert_eq!(leaf_frame(&s), None);
    }
}
