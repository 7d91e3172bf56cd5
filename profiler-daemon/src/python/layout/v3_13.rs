//! CPython 3.13, from the 3.13.18 headers (identical for these fields in
//! 3.13.5): `Include/cpython/pystate.h`, `Include/internal/pycore_frame.h`,
//! `Include/cpython/code.h`, `Include/internal/pycore_runtime.h` (which
//! also defines `_Py_DebugOffsets`).
use super::debug_offsets::Fields;
use super::*;

pub const HEADERS: &str = "3.13.18";

/// `co_flags` bit of shim code objects (`_Py_InitCleanup`, the frame that
/// runs after a Python `__init__` called by a specialised CALL).
pub const CO_NO_MONITORING_EVENTS: u32 = 0x0200_0000;

pub fn layout() -> Layout {
    Layout {
        minor: Minor::V3_13,
        threads: ThreadsLayout {
            runtime_interpreters_head: 632,
            interp_next: 7264,
            interp_threads_head: 7344,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 72, // current_frame
            cframe_frame: None,
        },
        frame: FrameLayout {
            code: 0, // f_executable (a PyObject*: code object, or None)
            previous: 8,
            instr: 56, // instr_ptr
            owner: 70,
            // FRAME_OWNED_BY_CSTACK: entry frames, f_executable is None.
            owner_boundary: Some(3),
            is_entry: None,
            owner_max: 3,
            code_tag_bits: 0,
        },
        code: CodeLayout {
            ob_type: 8,
            ob_size: 16,
            flags: 48,
            firstlineno: 68,
            filename: 112,
            qualname: 128,
            linetable: 136,
            adaptive: 200,
            shim_flags: CO_NO_MONITORING_EVENTS,
            checksum_masks: CHECKSUM_ALL,
        },
        string: StrLayout {
            length: 16,
            state: 32,
            ascii_data: 40,
            compact_data: 56,
        },
        bytes: BytesLayout {
            ob_size: 16,
            ob_sval: 32,
        },
        type_basicsize: 32,
        gilstate: Gilstate::TssKey {
            runtime_offset: 2160,
        },
        // PyInterpreterState.ceval.gil: `ceval` is the first member from
        // 3.13 on (offsetof() with the 3.13.0 headers).
        gil: GilLayout::Interpreter {
            pointer: 16,
            size: GIL_STATE_SIZE,
        },
    }
}

/// Slots (u64 index) of the fields pyebpf uses in 3.13's `_Py_DebugOffsets`.
pub static DEBUG_FIELDS: Fields = Fields {
    slots: 73,
    runtime_interpreters_head: 5,
    interp_next: 8,
    interp_threads_head: 9,
    tstate_next: 21,
    tstate_current_frame: 23,
    tstate_thread_id: 24,
    frame_size: 28,
    frame_previous: 29,
    frame_executable: 30,
    frame_instr_ptr: 31,
    frame_owner: 33,
    code_size: 34,
    code_filename: 35,
    code_qualname: 37,
    code_linetable: 38,
    code_firstlineno: 39,
    code_argcount: 40,
    code_adaptive: 43,
    ob_type: 45,
    type_basicsize: None,
    bytes_ob_size: 65,
    bytes_ob_sval: 66,
    str_state: 68,
    str_length: 69,
    str_ascii_size: 70,
    str_compact_size: None,
};
