//! CPython 3.12, from the 3.12 headers (`Include/cpython/pystate.h`,
//! `Include/internal/pycore_frame.h`, `Include/cpython/code.h`,
//! `Include/internal/pycore_interp.h`, `Include/internal/pycore_runtime.h`,
//! `Include/cpython/unicodeobject.h`). 3.12 publishes no `_Py_DebugOffsets`.
//! No Debian suite ships 3.12, so this layout is tested against a process
//! built from the same header structures (tests/tools/cpython312_image.c),
//! not against a real 3.12.
use super::*;

pub const HEADERS: &str = "3.12.0";

pub fn layout() -> Layout {
    Layout {
        minor: Minor::V3_12,
        threads: ThreadsLayout {
            runtime_interpreters_head: 40,
            interp_next: 0,
            // after id, id_refcount, requires_idref, id_mutex, _initialized,
            // finalizing, monitoring_version, last_restart_version
            interp_threads_head: 72,
            tstate_next: 8,
            tstate_thread_id: 136,
            tstate_frame: 56, // _PyCFrame *cframe
            cframe_frame: Some(0),
        },
        frame: FrameLayout {
            code: 0, // f_code
            previous: 8,
            instr: 56, // prev_instr
            owner: 70,
            // FRAME_OWNED_BY_CSTACK: the entry frame of each
            // `_PyEval_EvalFrameDefault`, whose code is the `<shim>`
            // interpreter trampoline.
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
            adaptive: 192,
            shim_flags: 0,
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
        // A direct field of _PyRuntimeState since 3.12 (cpython#101161).
        gilstate: Gilstate::TssKey {
            runtime_offset: 1544,
        },
        // PyInterpreterState.ceval.gil (offsetof() with the 3.12.1 headers).
        gil: GilLayout::Interpreter {
            pointer: 384,
            size: GIL_STATE_SIZE,
        },
    }
}
