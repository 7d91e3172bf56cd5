//! How a function reads a thread-local variable, from its machine code.
//!
//! CPython 3.15 keeps each thread's gilstate binding in the `_Py_tss_gilstate`
//! thread-local, whose symbol distributions strip. `PyGILState_GetThisThreadState`
//! is exported and does nothing but load it, so its few instructions say
//! where the variable is, in whichever TLS model the build used. The answer
//! is only a candidate: [`super::gilstate`] proves it on the live threads.
use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// Where a thread-local variable is, as the code that loads it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsAccess {
    /// `mov %fs:OFF, %reg`: local-exec, the executable's own static TLS.
    LocalExec { tp_offset: i64 },
    /// The GOT slot at link-time address `got` holds the variable's offset
    /// from the thread pointer (initial-exec), plus `addend`.
    InitialExec { got: u64, addend: i64 },
    /// `__tls_get_addr(&tls_index)` + `addend` (general-dynamic): the
    /// `{module, offset}` pair at link-time address `tls_index` names the
    /// module's TLS block.
    GeneralDynamic { tls_index: u64, addend: i64 },
    /// A TLS descriptor at `desc` (`-mtls-dialect=gnu2`): for a module in
    /// static TLS its second word is the offset from the thread pointer.
    Descriptor { desc: u64, addend: i64 },
}

/// What a register is known to hold while following the function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Value {
    /// The address `rip`-relative operand `addr` (from `lea`).
    Address(u64),
    /// The 8 bytes at link-time address `addr` (from `mov`).
    Loaded(u64),
    /// The thread pointer (`mov %fs:0, %reg`).
    ThreadPointer,
    /// Thread pointer + the 8 bytes at `addr`.
    TpPlusLoaded(u64),
    /// The TLS block of `__tls_get_addr(&tls_index at addr)`.
    TlsBlock(u64),
    /// What the descriptor call at `addr` returned (an offset from the TP).
    DescOffset(u64),
}

/// Most instructions followed before giving up.
const MAX_INSTRUCTIONS: usize = 40;

fn is_fs_absolute(i: &Instruction) -> bool {
    i.memory_segment() == Register::FS
        && i.memory_base() == Register::None
        && i.memory_index() == Register::None
}

/// The memory operand of `i` (which must have one): `base + disp` where
/// base is a general register, or `None` for other forms.
fn base_disp(i: &Instruction) -> Option<(Register, i64)> {
    if i.memory_index() != Register::None || i.memory_base() == Register::None {
        return None;
    }
    Some((
        i.memory_base().full_register(),
        i.memory_displacement64() as i64,
    ))
}

/// Decode the function whose bytes are `code`, linked at `vaddr`, and say
/// which thread-local variable it returns; `None` if it does something
/// else (calls `pthread_getspecific`, as 3.11-3.14 do) or something this
/// reader does not follow.
pub fn decode(code: &[u8], vaddr: u64) -> Option<TlsAccess> {
    let mut regs: [Option<Value>; 16] = [None; 16];
    let slot = |r: Register| -> Option<usize> {
        let r = r.full_register();
        (r.is_gpr64())
            .then(|| (r as usize).wrapping_sub(Register::RAX as usize))
            .filter(|&i| i < 16)
    };
    let mut decoder = Decoder::with_ip(64, code, vaddr, DecoderOptions::NONE);
    let mut instr = Instruction::default();
    for _ in 0..MAX_INSTRUCTIONS {
        if !decoder.can_decode() {
            return None;
        }
        decoder.decode_out(&mut instr);
        let dst = (instr.op_count() > 0 && instr.op0_kind() == OpKind::Register)
            .then(|| instr.op0_register())
            .and_then(slot);
        let mem_src = instr.op_count() == 2 && instr.op1_kind() == OpKind::Memory;
        match instr.mnemonic() {
            Mnemonic::Ret | Mnemonic::Jmp | Mnemonic::Ud2 => return None,
            Mnemonic::Mov if mem_src => {
                let dst = dst?;
                let value = if is_fs_absolute(&instr) {
                    let off = instr.memory_displacement64() as i64;
                    if off == 0 {
                        Value::ThreadPointer
                    } else {
                        return Some(TlsAccess::LocalExec { tp_offset: off });
                    }
                } else if instr.is_ip_rel_memory_operand() {
                    Value::Loaded(instr.ip_rel_memory_address())
                } else if instr.memory_segment() == Register::FS {
                    // mov %fs:(%reg), %dst: reg holds an offset from the TP.
                    let (base, disp) = base_disp(&instr)?;
                    match regs[slot(base)?]? {
                        Value::Loaded(got) => {
                            return Some(TlsAccess::InitialExec { got, addend: disp })
                        }
                        Value::DescOffset(desc) => {
                            return Some(TlsAccess::Descriptor { desc, addend: disp })
                        }
                        _ => return None,
                    }
                } else {
                    // mov disp(%reg), %dst: a load from a TLS address.
                    let (base, disp) = base_disp(&instr)?;
                    match regs[slot(base)?]? {
                        Value::TlsBlock(ti) => {
                            return Some(TlsAccess::GeneralDynamic {
                                tls_index: ti,
                                addend: disp,
                            })
                        }
                        Value::TpPlusLoaded(got) => {
                            return Some(TlsAccess::InitialExec { got, addend: disp })
                        }
                        _ => return None,
                    }
                };
                regs[dst] = Some(value);
            }
            Mnemonic::Lea if mem_src && instr.is_ip_rel_memory_operand() => {
                regs[dst?] = Some(Value::Address(instr.ip_rel_memory_address()));
            }
            Mnemonic::Add if mem_src && instr.is_ip_rel_memory_operand() => {
                let d = dst?;
                match regs[d] {
                    Some(Value::ThreadPointer) => {
                        regs[d] = Some(Value::TpPlusLoaded(instr.ip_rel_memory_address()))
                    }
                    _ => return None,
                }
            }
            Mnemonic::Call => {
                // __tls_get_addr(rdi = &tls_index), or a TLS descriptor's
                // function (rax = &desc, `call *(%rax)`).
                let rax = slot(Register::RAX)?;
                let rdi = slot(Register::RDI)?;
                let result = match (regs[rdi], regs[rax]) {
                    _ if instr.op0_kind() == OpKind::Memory => match regs[rax] {
                        Some(Value::Address(desc)) => Value::DescOffset(desc),
                        _ => return None,
                    },
                    (Some(Value::Address(ti)), _) => Value::TlsBlock(ti),
                    _ => return None,
                };
                regs = [None; 16];
                regs[rax] = Some(result);
            }
            // Prologue and padding: no effect on what is tracked.
            Mnemonic::Endbr64 | Mnemonic::Nop | Mnemonic::Push | Mnemonic::Pop => {}
            Mnemonic::Mov if instr.op_count() == 2 && instr.op1_kind() == OpKind::Register => {
                // mov %src, %dst (e.g. the frame pointer set-up).
                let src = slot(instr.op1_register()).and_then(|s| regs[s]);
                if let Some(d) = dst {
                    regs[d] = src;
                }
            }
            _ => {
                // Anything else that writes a tracked register loses it.
                if let Some(d) = dst {
                    regs[d] = None;
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    /// Debian 3.15.2's static `/usr/bin/python3.15`.
    #[test]
    fn local_exec() {
        let code = hex("f3 0f 1e fa 64 48 8b 04 25 d8 ff ff ff c3");
        assert_eq!(
            decode(&code, 0x42fa7d),
            Some(TlsAccess::LocalExec { tp_offset: -0x28 })
        );
    }

    /// Debian 3.15.2's `libpython3.15.so.1.0`: `lea ti(%rip),%rdi; call
    /// __tls_get_addr@plt; mov 0x28(%rax),%rax`.
    #[test]
    fn general_dynamic() {
        let code = hex(
            "f3 0f 1e fa 55 48 89 e5 48 8d 3d 61 a6 4a 00 e8 5c 9d cf ff 5d 48 8b 80 28 00 00 00 c3",
        );
        assert_eq!(
            decode(&code, 0x3cf120),
            Some(TlsAccess::GeneralDynamic {
                tls_index: 0x879790,
                addend: 0x28
            })
        );
    }

    /// `mov x@gottpoff(%rip),%rax; mov %fs:(%rax),%rax`, and the variant
    /// that adds the GOT slot to `%fs:0`.
    #[test]
    fn initial_exec() {
        let code = hex("48 8b 05 00 10 00 00 64 48 8b 00 c3");
        assert_eq!(
            decode(&code, 0x1000),
            Some(TlsAccess::InitialExec {
                got: 0x2007,
                addend: 0
            })
        );
        let code = hex("64 48 8b 04 25 00 00 00 00 48 03 05 00 10 00 00 48 8b 40 08 c3");
        assert_eq!(
            decode(&code, 0x1000),
            Some(TlsAccess::InitialExec {
                got: 0x2010,
                addend: 8
            })
        );
    }

    /// `lea x@tlsdesc(%rip),%rax; call *x@tlscall(%rax); mov %fs:(%rax),%rax`.
    #[test]
    fn descriptor() {
        let code = hex("48 8d 05 00 10 00 00 ff 10 64 48 8b 00 c3");
        assert_eq!(
            decode(&code, 0x1000),
            Some(TlsAccess::Descriptor {
                desc: 0x2007,
                addend: 0
            })
        );
    }

    /// 3.14 and older call `PyThread_tss_get` on `autoTSSkey`: no
    /// thread-local variable.
    #[test]
    fn pthread_key_versions_are_not_thread_locals() {
        // Debian 3.14.10's static build.
        let code =
            hex("f3 0f 1e fa 83 3d 3b 49 77 00 00 74 0a bf e0 10 ba 00 e9 7f 2e 11 00 31 c0 c3");
        assert_eq!(decode(&code, 0x42c79a), None);
        // Debian 3.13.5's libpython.
        let code = hex(
            "f3 0f 1e fa 48 8b 05 d5 f2 3d 00 53 48 8d 98 70 08 00 00 48 89 df e8 35 29 01 00 85 c0 74 11 48 89 df 5b e9 b8 27 01 00",
        );
        assert_eq!(decode(&code, 0x2ba9f0), None);
        assert_eq!(decode(&[], 0), None);
        assert_eq!(decode(&[0x0f], 0), None);
    }
}
