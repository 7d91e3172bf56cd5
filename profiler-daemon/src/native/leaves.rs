//! Native leaves: the function each sampled thread was in, named on a
//! thread of its own because blazesym's symbolizer is not `Send` while the
//! store that asks is shared. One request per batch of new stacks, never
//! per sample.
//!
//! The thread starts at the first request, so a process that drops its
//! capabilities while it has one thread can create a namer before.
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};

use super::stacks::{NativeLimits, NativeStacks, NativeStats};
use super::user::{NativeSymbol, Symbol, Unsymbolised};
use crate::profile::Frame;

/// What the naming thread is asked.
enum Request {
    /// Name each (pid, instruction pointer).
    Name {
        lookups: Vec<(u32, u64)>,
        reply: SyncSender<Vec<Option<Frame>>>,
    },
    /// Forget what is kept of a pid (its process was replaced or ended).
    Forget(u32),
    Stats(SyncSender<NativeStats>),
}

/// Names native leaves; cheap to share (`Arc`) between threads.
pub struct LeafNamer {
    limits: NativeLimits,
    tx: Mutex<Option<Sender<Request>>>,
}

impl std::fmt::Debug for LeafNamer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafNamer").finish_non_exhaustive()
    }
}

/// Where the naming thread failed: every leaf it should have named says so.
const FAILED: &str = "[native symbolizer failed]";

impl LeafNamer {
    pub fn new(limits: NativeLimits) -> Arc<LeafNamer> {
        Arc::new(LeafNamer {
            limits,
            tx: Mutex::new(None),
        })
    }

    /// The naming thread's sender, started on first use.
    fn sender(&self) -> Option<Sender<Request>> {
        let mut tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if tx.is_none() {
            let (s, r) = mpsc::channel();
            let limits = self.limits;
            let spawned = std::thread::Builder::new()
                .name("native-leaves".into())
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

    /// The native leaf of each (pid, user instruction pointer), in order:
    /// `None` where the thread was in the eval loop (its Python frames
    /// stand for it).
    pub fn name(&self, lookups: Vec<(u32, u64)>) -> Vec<Option<Frame>> {
        let n = lookups.len();
        let failed = || vec![Some(unnamed(FAILED)); n];
        let Some(tx) = self.sender() else {
            return failed();
        };
        let (reply, answer) = mpsc::sync_channel(1);
        if tx.send(Request::Name { lookups, reply }).is_err() {
            return failed();
        }
        match answer.recv() {
            Ok(v) if v.len() == n => v,
            _ => failed(),
        }
    }

    /// Drops what is kept for `pid`.
    pub fn forget_pid(&self, pid: u32) {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(Request::Forget(pid));
        }
    }

    /// The naming thread's counters (zero before it started).
    pub fn stats(&self) -> NativeStats {
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(tx) = tx else {
            return NativeStats::default();
        };
        let (reply, answer) = mpsc::sync_channel(1);
        if tx.send(Request::Stats(reply)).is_err() {
            return NativeStats::default();
        }
        answer.recv().unwrap_or_default()
    }
}

/// The naming thread: until every sender is gone.
fn serve(mut stacks: NativeStacks, requests: Receiver<Request>) {
    for r in requests {
        match r {
            Request::Name { lookups, reply } => {
                let frames = lookups
                    .iter()
                    .map(|&(pid, ip)| leaf(&mut stacks, pid, ip))
                    .collect();
                let _ = reply.send(frames);
            }
            Request::Forget(pid) => stacks.forget_pid(pid),
            Request::Stats(reply) => {
                let _ = reply.send(stacks.stats());
            }
        }
    }
}

/// The leaf at `ip` of `pid`. A process whose mappings can no longer be
/// read (it exited) gives a leaf that says so.
fn leaf(stacks: &mut NativeStacks, pid: u32, ip: u64) -> Option<Frame> {
    match stacks.symbolise(pid, &[ip]) {
        Ok(mut s) => frame(&*s.pop()?),
        Err(_) => Some(unnamed("[process gone]")),
    }
}

fn unnamed(module: &str) -> Frame {
    Frame::Native {
        function: None,
        module: module.into(),
    }
}

/// The frame of a native symbol; `None` for the eval loop.
pub fn frame(symbol: &NativeSymbol) -> Option<Frame> {
    if symbol.is_eval_loop() {
        return None;
    }
    Some(match &symbol.symbol {
        Symbol::Function { name, .. } => Frame::Native {
            function: Some(name.clone()),
            module: symbol.module.clone(),
        },
        Symbol::Unsymbolised(Unsymbolised::NotMapped) => unnamed("[unmapped]"),
        Symbol::Unsymbolised(_) => Frame::Native {
            function: None,
            module: symbol.module.clone(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The leaf of this very thread's code: a function of this test binary
    /// is named; an address in no mapping says so; a pid that does not exist
    /// says the process is gone.
    #[test]
    fn names_leaves_of_a_live_process() {
        let namer = LeafNamer::new(NativeLimits::default());
        let pid = std::process::id();
        let here = names_leaves_of_a_live_process as fn() as usize as u64;
        let got = namer.name(vec![(pid, here), (pid, 8), (u32::MAX - 1, here)]);
        match &got[0] {
            Some(Frame::Native {
                function: Some(f), ..
            }) => assert!(f.contains("names_leaves_of_a_live_process"), "{f}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(got[1], Some(unnamed("[unmapped]")));
        assert_eq!(got[2], Some(unnamed("[process gone]")));
        assert!(namer.stats().maps_reads >= 1);
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
        assert_eq!(frame(&s), None);
    }
}
