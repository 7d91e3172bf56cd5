//! Where a process's GIL state is: the memory its waiters block on. A
//! thread that waits for the GIL sleeps in a futex on the condition
//! variable or mutex inside `struct _gil_runtime_state`, so an off-CPU
//! sample in `futex()` whose address falls in that range is a GIL wait.
use std::ops::Range;

use crate::process::memory::{MemoryError, RemoteMemory};
use crate::python::layout::{GilLayout, Layout};

/// Interpreters followed before giving up on finding the main (last) one.
const MAX_INTERPRETERS: usize = 64;
/// The main interpreter's own GIL (`_gil`) lies inside its
/// `PyInterpreterState`, well within this many bytes of its start.
const MAX_GIL_OFFSET: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum GilError {
    #[error("reading the interpreter state: {0}")]
    Memory(#[from] MemoryError),
    #[error("no interpreter state")]
    NoInterpreter,
    #[error(
        "the main interpreter's GIL pointer ({gil:#x}) is not inside its state (at {interp:#x})"
    )]
    Implausible { interp: u64, gil: u64 },
}

/// The address range of the GIL state of the interpreter whose
/// `_PyRuntime` is at `runtime_addr`.
pub fn locate<M: RemoteMemory>(
    mem: &M,
    runtime_addr: u64,
    layout: &Layout,
) -> Result<Range<u64>, GilError> {
    match layout.gil {
        GilLayout::Runtime { offset, size } => {
            let start = runtime_addr.wrapping_add(offset);
            Ok(start..start.wrapping_add(size))
        }
        GilLayout::Interpreter { pointer, size } => {
            let interp = main_interpreter(mem, runtime_addr, layout)?;
            let gil = mem.read_u64(interp.wrapping_add(pointer))?;
            // The main interpreter uses its own `_gil`: a pointer anywhere
            // else means the offset is wrong for this build.
            if gil < interp || gil - interp >= MAX_GIL_OFFSET || gil % 8 != 0 {
                return Err(GilError::Implausible { interp, gil });
            }
            Ok(gil..gil.wrapping_add(size))
        }
    }
}

/// The main interpreter: the first created, so the last of the list that
/// `_PyRuntime.interpreters.head` starts (newest first).
fn main_interpreter<M: RemoteMemory>(
    mem: &M,
    runtime_addr: u64,
    layout: &Layout,
) -> Result<u64, GilError> {
    let t = &layout.threads;
    let mut interp = mem.read_u64(runtime_addr.wrapping_add(t.runtime_interpreters_head))?;
    if interp == 0 {
        return Err(GilError::NoInterpreter);
    }
    for _ in 0..MAX_INTERPRETERS {
        let next = mem.read_u64(interp.wrapping_add(t.interp_next))?;
        if next == 0 {
            return Ok(interp);
        }
        interp = next;
    }
    Err(GilError::NoInterpreter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::elf::ElfFile;
    use crate::python::layout::{Minor, GIL_STATE_SIZE};
    use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
    use std::collections::HashMap;

    struct Image(HashMap<u64, u64>);

    impl RemoteMemory for Image {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let v = self.0.get(&addr).ok_or(MemoryError::Short {
                pid: 0,
                addr,
                len: buf.len(),
                got: 0,
            })?;
            buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn runtime_and_interpreter_layouts() {
        let l = Minor::V3_11.header_layout();
        let r = locate(&Image(HashMap::new()), 0x10_000, &l).unwrap();
        assert_eq!(r, 0x10_000 + 360..0x10_000 + 360 + GIL_STATE_SIZE);

        // 3.13: head -> a subinterpreter -> main, whose ceval.gil points
        // at its own _gil.
        let l = Minor::V3_13.header_layout();
        let t = l.threads;
        let (rt, sub, main) = (0x1000u64, 0x50_000u64, 0x90_000u64);
        let mut m = HashMap::from([
            (rt + t.runtime_interpreters_head, sub),
            (sub + t.interp_next, main),
            (main + t.interp_next, 0),
            (main + 16, main + 7752),
        ]);
        let r = locate(&Image(m.clone()), rt, &l).unwrap();
        assert_eq!(r, main + 7752..main + 7752 + GIL_STATE_SIZE);
        m.insert(main + 16, 0x1234_5678);
        assert!(matches!(
            locate(&Image(m.clone()), rt, &l),
            Err(GilError::Implausible { .. })
        ));
        m.insert(rt + t.runtime_interpreters_head, 0);
        assert!(matches!(
            locate(&Image(m), rt, &l),
            Err(GilError::NoInterpreter)
        ));
    }

    /// The offsets of `_PyRuntime` that `PyEval_ThreadsInitialized` reads:
    /// it is `return gil->locked >= 0` on `_PyRuntime.ceval.gil` in 3.11,
    /// read directly (static build) or through `_PyRuntime`'s GOT slot
    /// (shared library).
    fn runtime_reads(file: &ElfFile) -> Vec<i64> {
        let runtime = file.dynamic_symbol("_PyRuntime").unwrap().unwrap().value;
        let f = file
            .dynamic_symbol("PyEval_ThreadsInitialized")
            .unwrap()
            .unwrap();
        let code = file.read_vaddr(f.value, 32).unwrap();
        let mut d = Decoder::with_ip(64, &code, f.value, DecoderOptions::NONE);
        let mut i = Instruction::default();
        let mut out = Vec::new();
        // A register loaded from a GOT slot holds `_PyRuntime` (the only
        // global the function reads).
        let mut runtime_in: Option<Register> = None;
        while d.can_decode() {
            d.decode_out(&mut i);
            if i.mnemonic() == Mnemonic::Ret {
                break;
            }
            let has_mem = (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory);
            if !has_mem {
                continue;
            }
            if i.is_ip_rel_memory_operand() {
                let target = i.ip_rel_memory_address();
                if i.mnemonic() == Mnemonic::Mov && i.op0_kind() == OpKind::Register {
                    if target.wrapping_sub(runtime) < 4096 {
                        out.push((target - runtime) as i64);
                    } else {
                        runtime_in = Some(i.op0_register().full_register());
                    }
                }
            } else if Some(i.memory_base().full_register()) == runtime_in {
                out.push(i.memory_displacement64() as i64);
            }
        }
        out
    }

    /// The 3.11 layout's GIL against both host interpreters' machine code.
    #[test]
    fn the_3_11_gil_offset_matches_the_binaries() {
        let GilLayout::Runtime { offset, .. } = Minor::V3_11.header_layout().gil else {
            panic!("3.11 keeps its GIL in _PyRuntime");
        };
        // pyenv's python3 is a shared build: libpython beside its bin/.
        let python3 = crate::python::test_python::python3();
        let shared = python3
            .parent()
            .and_then(|bin| bin.parent())
            .map(|prefix| prefix.join("lib/libpython3.11.so.1.0"))
            .filter(|p| p.exists())
            .expect("pyenv's python3 with libpython3.11.so.1.0 in its lib/");
        for path in [std::path::PathBuf::from("/usr/bin/python3.11"), shared] {
            let file = ElfFile::open(&path).unwrap();
            let reads = runtime_reads(&file);
            // `locked` is the third word of `_gil_runtime_state`.
            assert_eq!(reads, [offset as i64 + 16], "{}", path.display());
        }
    }
}
