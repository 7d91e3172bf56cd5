//! CPython 3.15, from the 3.15.2 headers: `Include/cpython/pystate.h`,
//! `Include/internal/pycore_interpframe_structs.h`,
//! `Include/internal/pycore_stackref.h`, `Include/cpython/code.h`,
//! `Include/internal/pycore_runtime_structs.h`,
//! `Include/internal/pycore_debug_offsets.h`.
use super::debug_offsets::Fields;
use super::v3_13::CO_NO_MONITORING_EVENTS;
use super::*;

pub const HEADERS: &str = "3.15.2";

pub fn layout() -> Layout {
    Layout {
        minor: Minor::V3_15,
        threads: ThreadsLayout {
            runtime_interpreters_head: 936,
            interp_next: 7264,
            interp_threads_head: 7336,
            tstate_next: 8,
            tstate_thread_id: 176,
            tstate_frame: 72, // current_frame
            cframe_frame: None,
        },
        frame: FrameLayout {
            code: 0, // f_executable, a _PyStackRef
            previous: 8,
            instr: 56, // instr_ptr
            owner: 74,
            // FRAME_OWNED_BY_INTERPRETER (3) marks entry frames; CSTACK is gone.
            owner_boundary: Some(3),
            is_entry: None,
            owner_max: 3,
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
        // `autoTSSkey` is gone (cpython gh-131185): the binding is the
        // `_Py_tss_gilstate` thread-local.
        gilstate: Gilstate::ThreadLocal,
        // As in 3.14 (read off the headers, not an interpreter).
        gil: GilLayout::Interpreter {
            pointer: 16,
            size: GIL_STATE_SIZE,
        },
    }
}

/// Slots (u64 index) of the fields pyebpf uses in 3.15's `_Py_DebugOffsets`
/// (which added the thread state's `base_frame`, `last_profiled_frame`, GIL
/// and exception fields, an `err_stackitem` group, `tp_basicsize`, a heap
/// type group and `compactunicodeobject_size`).
pub static DEBUG_FIELDS: Fields = Fields {
    slots: 111,
    runtime_interpreters_head: 5,
    interp_next: 8,
    interp_threads_head: 9,
    tstate_next: 24,
    tstate_current_frame: 26,
    tstate_thread_id: 30,
    frame_size: 39,
    frame_previous: 40,
    frame_executable: 41,
    frame_instr_ptr: 42,
    frame_owner: 44,
    code_size: 47,
    code_filename: 48,
    code_qualname: 50,
    code_linetable: 51,
    code_firstlineno: 52,
    code_argcount: 53,
    code_adaptive: 56,
    ob_type: 59,
    type_basicsize: Some(64),
    bytes_ob_size: 87,
    bytes_ob_sval: 88,
    str_state: 90,
    str_length: 91,
    str_ascii_size: 92,
    str_compact_size: Some(93),
};
