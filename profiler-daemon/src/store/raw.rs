//! A sampled stack as the store keys it before symbolisation (code objects,
//! instruction indexes, kernel addresses, and what the thread was waiting
//! for), and its symbolisation into line-level frames.
use std::ops::Range;

use profiler_common::RawFrame;

use crate::bpf::events::{RawSample, SampleKind};
use std::sync::Arc;

use profiler_common::ENTRY_MARK_INSTR;

use crate::native::kernel::KernelSymbols;
use crate::native::merge::{merge, Merged, NativeFrameKind, PythonFrameKind, Side};
use crate::native::service::{self, NativeWalk};
use crate::native::user::NativeSymbol;
use crate::profile::Frame;
use crate::python::symbolizer::Symbolizer;

use super::TargetMemory;

/// `futex(2)` on x86-64: the system call a thread waiting for the GIL
/// sleeps in (on the GIL's condition variable or mutex).
const SYS_FUTEX: i64 = 202;

/// Bytes a raw-stack cache entry costs beyond its frames.
const RAW_ENTRY_OVERHEAD: usize = 96;

/// Why an off-CPU thread was off CPU, when the sample tells: the synthetic
/// leaf of its stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wait {
    /// Nothing known beyond its stacks (or an on-CPU sample).
    Unknown,
    /// Blocked in a futex on the interpreter's GIL state.
    Gil,
    /// Switched out still runnable: it waited for a CPU.
    Runnable,
}

impl Wait {
    /// What the off-CPU sample `s` waited for, in a process whose GIL state
    /// is `gil`. A preempted thread waited for a CPU whatever system call
    /// it was in.
    pub fn of(s: &RawSample, gil: Option<&Range<u64>>) -> Wait {
        if s.kind != SampleKind::OffCpu {
            return Wait::Unknown;
        }
        if s.preempted {
            return Wait::Runnable;
        }
        match (s.entry, gil) {
            (Some(e), Some(g)) if e.nr == SYS_FUTEX && g.contains(&e.arg0) => Wait::Gil,
            _ => Wait::Unknown,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RawKey {
    truncated: bool,
    partial: bool,
    frames: Box<[RawFrame]>,
    /// Kernel return addresses, innermost first.
    kernel: Box<[u64]>,
    /// The first kernel address is where the CPU was (an on-CPU sample),
    /// not a return address.
    exact_leaf: bool,
    kernel_truncated: bool,
    kernel_unavailable: bool,
    wait: Wait,
    /// Its native frames, named at symbolisation.
    native: NativeKey,
    /// The thread, when stacks are kept per thread.
    tid: Option<u32>,
}

/// What a raw stack keeps of its native frames.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NativeKey {
    None,
    /// The user instruction pointer: the native leaf.
    Leaf(u64),
    /// The unwound stack, merged with the Python frames.
    Stack(NativeWalk),
}

impl NativeKey {
    /// Bytes it holds beyond its own size.
    fn bytes(&self) -> usize {
        match self {
            NativeKey::Stack(w) => {
                std::mem::size_of_val(&*w.lookups) + std::mem::size_of_val(&*w.activations)
            }
            _ => 0,
        }
    }

    /// The addresses to name.
    pub fn lookups(&self) -> &[u64] {
        match self {
            NativeKey::None => &[],
            NativeKey::Leaf(ip) => std::slice::from_ref(ip),
            NativeKey::Stack(w) => &w.lookups,
        }
    }
}

impl RawKey {
    /// The key of `s`, from a process whose GIL state is `gil`; with
    /// `native`, keeping its native stack if unwound, else its user
    /// instruction pointer for the native leaf; with `per_thread`, its
    /// thread.
    pub fn of(
        mut s: RawSample,
        gil: Option<&Range<u64>>,
        native: bool,
        per_thread: bool,
    ) -> RawKey {
        let wait = Wait::of(&s, gil);
        let native = match (native, s.native.take(), s.regs) {
            (false, ..) => NativeKey::None,
            (true, Some(w), _) => NativeKey::Stack(w),
            (true, None, Some(r)) => NativeKey::Leaf(r.ip),
            (true, None, None) => NativeKey::None,
        };
        // An entry mark's boundary address differs from sample to sample;
        // only where it is matters.
        for f in &mut s.frames {
            if f.instr == ENTRY_MARK_INSTR {
                f.code = 0;
            }
        }
        RawKey {
            truncated: s.truncated,
            partial: s.read_error.is_some(),
            frames: s.frames.into_boxed_slice(),
            kernel: s.kernel.into_boxed_slice(),
            exact_leaf: s.kind == SampleKind::Cpu,
            kernel_truncated: s.kernel_truncated,
            kernel_unavailable: s.kernel_error,
            wait,
            native,
            tid: per_thread.then_some(s.tid),
        }
    }

    /// Its native frames, to name.
    pub fn native(&self) -> &NativeKey {
        &self.native
    }

    /// Its thread, when kept.
    pub fn tid(&self) -> Option<u32> {
        self.tid
    }

    /// An off-CPU interval's key (an on-CPU sample's leaf is exact).
    pub fn off_cpu(&self) -> bool {
        !self.exact_leaf
    }

    /// An off-CPU interval spent waiting for the GIL.
    pub fn gil_wait(&self) -> bool {
        self.wait == Wait::Gil
    }

    pub fn bytes(&self) -> usize {
        RAW_ENTRY_OVERHEAD
            + std::mem::size_of_val(&*self.frames)
            + std::mem::size_of_val(&*self.kernel)
            + self.native.bytes()
    }
}

/// A native frame for the merge: its symbol, and whether its stack holds
/// a boundary frame (an eval-loop activation, named or not).
struct NativeItem {
    symbol: Arc<NativeSymbol>,
    activation: bool,
}

impl NativeFrameKind for NativeItem {
    fn is_eval_loop(&self) -> bool {
        self.activation || self.symbol.is_eval_loop()
    }
}

/// A Python frame and whether its activation starts with it, for the merge.
struct PyItem {
    frame: Frame,
    entry: bool,
}

impl PythonFrameKind for PyItem {
    fn is_entry(&self) -> bool {
        self.entry
    }
}

/// Symbolises a raw stack, root first: its `thread` frame if kept, the
/// Python frames (walked leaf first) with its native frames (`native`: the
/// symbols of [`NativeKey::lookups`]; a leaf below them, a stack merged with
/// them), then the kernel's (sampled innermost first), then what the thread
/// waited for. Without kernel symbols, kernel frames show their addresses.
pub fn symbolise(
    symbols: &mut Symbolizer<TargetMemory>,
    kernel: Option<&KernelSymbols>,
    native: &[Arc<NativeSymbol>],
    thread: Option<Frame>,
    key: &RawKey,
) -> Vec<Frame> {
    let mut v = Vec::with_capacity(key.frames.len() + key.kernel.len() + native.len() + 5);
    v.extend(thread);
    if key.truncated {
        v.push(Frame::Truncated);
    } else if key.partial {
        v.push(Frame::Partial);
    }
    match (&key.native, native) {
        (NativeKey::Stack(w), _) if native.len() == w.lookups.len() => {
            // Leaf first, entry marks folded into the frame before them.
            let mut python: Vec<PyItem> = Vec::with_capacity(key.frames.len());
            for f in key.frames.iter() {
                if f.instr == ENTRY_MARK_INSTR {
                    if let Some(last) = python.last_mut() {
                        last.entry = true;
                    }
                } else {
                    python.push(PyItem {
                        frame: symbols.frame(f),
                        entry: false,
                    });
                }
            }
            let native: Vec<NativeItem> = native
                .iter()
                .enumerate()
                .map(|(i, s)| NativeItem {
                    symbol: s.clone(),
                    activation: u16::try_from(i)
                        .is_ok_and(|i| w.activations.binary_search(&i).is_ok()),
                })
                .collect();
            let merged = merge(
                Side {
                    frames: &native,
                    complete: w.complete,
                },
                Side {
                    frames: &python,
                    complete: !key.truncated && !key.partial,
                },
            );
            v.extend(merged.into_iter().rev().map(|m| match m {
                Merged::Native(n) => service::frame(&n.symbol),
                Merged::Python(p) => p.frame.clone(),
                Merged::Marker(m) => Frame::NativeMarker(m),
            }));
        }
        _ => {
            let python = key.frames.iter().filter(|f| f.instr != ENTRY_MARK_INSTR);
            v.extend(python.rev().map(|f| symbols.frame(f)));
            if let (NativeKey::Leaf(_), [leaf]) = (&key.native, native) {
                v.extend(service::leaf_frame(leaf));
            }
        }
    }
    if key.kernel_unavailable {
        v.push(Frame::KernelUnavailable);
    } else if !key.kernel.is_empty() {
        if key.kernel_truncated {
            v.push(Frame::KernelTruncated);
        }
        let names = match kernel {
            Some(k) => k.names(&key.kernel, key.exact_leaf),
            None => key
                .kernel
                .iter()
                .map(|a| std::sync::Arc::from(format!("{a:#x}")))
                .collect(),
        };
        v.extend(
            names
                .into_iter()
                .rev()
                .map(|function| Frame::Kernel { function }),
        );
    }
    match key.wait {
        Wait::Unknown => {}
        Wait::Gil => v.push(Frame::GilWait),
        Wait::Runnable => v.push(Frame::Runnable),
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::events::KernelEntry;

    fn off_cpu(nr: i64, arg0: u64, preempted: bool) -> RawSample {
        RawSample {
            kind: SampleKind::OffCpu,
            preempted,
            entry: Some(KernelEntry { nr, arg0 }),
            ..RawSample::default()
        }
    }

    #[test]
    fn what_a_thread_waited_for() {
        let gil = 0x1000..0x10d0;
        let w = |s: &RawSample| Wait::of(s, Some(&gil));
        assert_eq!(w(&off_cpu(SYS_FUTEX, 0x1020, false)), Wait::Gil);
        assert_eq!(w(&off_cpu(SYS_FUTEX, 0x10cf, false)), Wait::Gil);
        // A futex elsewhere (a threading.Lock), the end of the range, or
        // another system call is not a GIL wait.
        assert_eq!(w(&off_cpu(SYS_FUTEX, 0x10d0, false)), Wait::Unknown);
        assert_eq!(w(&off_cpu(SYS_FUTEX, 0x7000, false)), Wait::Unknown);
        assert_eq!(w(&off_cpu(230, 0x1020, false)), Wait::Unknown);
        // Preempted: it waited for a CPU.
        assert_eq!(w(&off_cpu(SYS_FUTEX, 0x1020, true)), Wait::Runnable);
        // Unknown GIL, on-CPU samples, no kernel entry.
        assert_eq!(
            Wait::of(&off_cpu(SYS_FUTEX, 0x1020, false), None),
            Wait::Unknown
        );
        let mut cpu = off_cpu(SYS_FUTEX, 0x1020, false);
        cpu.kind = SampleKind::Cpu;
        assert_eq!(w(&cpu), Wait::Unknown);
        let mut no_entry = off_cpu(SYS_FUTEX, 0x1020, false);
        no_entry.entry = None;
        assert_eq!(w(&no_entry), Wait::Unknown);
    }
}
