//! CPython 3.14, from the 3.14.10 headers: `Include/cpython/pystate.h`,
//! `Include/internal/pycore_interpframe_structs.h`,
//! `Include/internal/pycore_stackref.h`, `Include/cpython/code.h`,
//! `Include/internal/pycore_runtime_structs.h`,
//! `Include/internal/pycore_debug_offsets.h`.
use super::debug_offsets::Fields;
use super::v3_13::CO_NO_MONITORING_EVENTS;
use super::*;

pub const HEADERS: &str = "3.14.10";

pub fn layout() -> Layout {
    Layout {
        minor: Minor::V3_14,
        threads: ThreadsLayout {
            runtime_interpreters_head: 808,
            interp_next: 7272,
            interp_threads_head: 7344,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 72, // current_frame
            cframe_frame: None,
        },
        frame: FrameLayout {
            code: 0, // f_executable, a _PyStackRef
            previous: 8,
            instr: 56, // instr_ptr
            owner: 74,
            // The owner enum was renumbered: FRAME_OWNED_BY_INTERPRETER (3)
            // marks entry frames, FRAME_OWNED_BY_CSTACK is 4.
            owner_boundary: Some(3),
            is_entry: None,
            owner_max: 4,
            // Py_TAG_BITS of the default (GIL) build.
            code_tag_bits: 3,
        },
        code: CodeLayout {
            ob_type: 8,
            ob_size: 16,
            flags: 48,
            firstlineno: 68,
            filename: 112,
            qualname: 128,
            linetable: 136,
            adaptive: 208,
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
            runtime_offset: 2336,
        },
        // PyInterpreterState.ceval.gil, as in 3.13 (read off the headers:
        // `struct _is` starts with `struct _ceval_state ceval`, whose
        // `gil` follows a uintptr_t and an int).
        gil: GilLayout::Interpreter {
            pointer: 16,
            size: GIL_STATE_SIZE,
        },
    }
}

/// Slots (u64 index) of the fields pyebpf uses in 3.14's `_Py_DebugOffsets`
/// (which added `threads_main`, `code_object_generation`, `tlbc_generation`,
/// the frame's `stackpointer` and `tlbc_index`, `co_tlbc`, sets, ...).
pub static DEBUG_FIELDS: Fields = Fields {
    slots: 95,
    runtime_interpreters_head: 5,
    interp_next: 8,
    interp_threads_head: 9,
    tstate_next: 24,
    tstate_current_frame: 26,
    tstate_thread_id: 27,
    frame_size: 31,
    frame_previous: 32,
    frame_executable: 33,
    frame_instr_ptr: 34,
    frame_owner: 36,
    code_size: 39,
    code_filename: 40,
    code_qualname: 42,
    code_linetable: 43,
    code_firstlineno: 44,
    code_argcount: 45,
    code_adaptive: 48,
    ob_type: 51,
    type_basicsize: None,
    bytes_ob_size: 75,
    bytes_ob_sval: 76,
    str_state: 78,
    str_length: 79,
    str_ascii_size: 80,
    str_compact_size: None,
};
