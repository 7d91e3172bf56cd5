//! CPython 3.11, from the 3.11.7 headers (`Include/cpython/pystate.h`,
//! `Include/internal/pycore_frame.h`, `Include/cpython/code.h`,
//! `Include/cpython/unicodeobject.h`, `Include/internal/pycore_runtime.h`).
//! 3.11 publishes no `_Py_DebugOffsets`; these offsets held from 3.11.0 to
//! 3.11.x on x86-64.
use super::*;

pub const HEADERS: &str = "3.11.7";

pub fn layout() -> Layout {
    Layout {
        minor: Minor::V3_11,
        threads: ThreadsLayout {
            runtime_interpreters_head: 40,
            interp_next: 0,
            interp_threads_head: 16,
            tstate_next: 8,
            tstate_thread_id: 152,
            tstate_frame: 56,      // _PyCFrame *cframe
            cframe_frame: Some(8), // after `use_tracing`
        },
        frame: FrameLayout {
            code: 32,
            previous: 48,
            instr: 56, // prev_instr
            owner: 69,
            // `is_entry` (+68) marks the first frame of a C-level call, but it
            // is a real Python frame: 3.11 has no boundary frames.
            owner_boundary: None,
            is_entry: Some(68),
            // FRAME_OWNED_BY_THREAD, _GENERATOR, _FRAME_OBJECT.
            owner_max: 2,
            code_tag_bits: 0,
        },
        code: CodeLayout {
            ob_type: 8,
            ob_size: 16,
            flags: 48,
            firstlineno: 72,
            filename: 112,
            qualname: 128,
            linetable: 136,
            adaptive: 184,
            shim_flags: 0,
            // Word 4 (+48) holds co_flags, then `co_warmup` and
            // `_co_linearray_entry_size`, which change at run time.
            checksum_masks: {
                let mut m = CHECKSUM_ALL;
                m[4] = 0xffff_ffff;
                m
            },
        },
        string: StrLayout {
            length: 16,
            state: 32,
            ascii_data: 48,   // PyASCIIObject still has `wstr`
            compact_data: 72, // + utf8_length, utf8, wstr_length
        },
        bytes: BytesLayout {
            ob_size: 16,
            ob_sval: 32,
        },
        type_basicsize: 32,
        // _PyRuntimeState.gilstate.autoTSSkey
        gilstate: Gilstate::TssKey {
            runtime_offset: 592,
        },
        // _PyRuntime.ceval.gil: offsetof() with the 3.11.7 and Debian's
        // 3.11.2 headers; both builds' PyEval_ThreadsInitialized read
        // `gil.locked` at _PyRuntime+376 (checked in process::gil's tests).
        gil: GilLayout::Runtime {
            offset: 360,
            size: GIL_STATE_SIZE,
        },
    }
}
