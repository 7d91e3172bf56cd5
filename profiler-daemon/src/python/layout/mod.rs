//! Where everything pyebpf reads sits in each CPython version's memory.
//!
//! One module per minor version (`v3_11` ... `v3_15`) is the single source of
//! that version's layout, transcribed from its headers (the patch release
//! each module names). From 3.13 on the interpreter also publishes most of
//! these offsets in `_Py_DebugOffsets` at the start of `_PyRuntime`;
//! [`debug_offsets`] reads them at attach time and they take precedence, so
//! a patch release that moves a field keeps working. Adding a version is one
//! new module, its entry in [`Minor`], and its tests.
//!
//! The BPF walker has no version knowledge: [`Layout::walker`] turns a
//! resolved layout into the offsets it follows.
use std::fmt;

use profiler_common::{PyLayout, CODE_READ_START, CODE_READ_WORDS, NO_BOUNDARY_OWNER, NO_CFRAME};

pub mod debug_offsets;
mod v3_11;
mod v3_12;
mod v3_13;
mod v3_14;
mod v3_15;

/// A CPython minor version pyebpf can profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Minor {
    V3_11,
    V3_12,
    V3_13,
    V3_14,
    V3_15,
}

impl Minor {
    pub const ALL: [Minor; 5] = [
        Minor::V3_11,
        Minor::V3_12,
        Minor::V3_13,
        Minor::V3_14,
        Minor::V3_15,
    ];

    /// The minor version `3.minor`, if pyebpf knows it.
    pub fn from_minor(minor: u8) -> Option<Minor> {
        Minor::ALL.into_iter().find(|m| m.number() == minor)
    }

    /// `11` for 3.11.
    pub fn number(self) -> u8 {
        match self {
            Minor::V3_11 => 11,
            Minor::V3_12 => 12,
            Minor::V3_13 => 13,
            Minor::V3_14 => 14,
            Minor::V3_15 => 15,
        }
    }

    /// The layout its headers describe, before anything the process
    /// publishes about itself.
    pub fn header_layout(self) -> Layout {
        match self {
            Minor::V3_11 => v3_11::layout(),
            Minor::V3_12 => v3_12::layout(),
            Minor::V3_13 => v3_13::layout(),
            Minor::V3_14 => v3_14::layout(),
            Minor::V3_15 => v3_15::layout(),
        }
    }

    /// The patch release whose headers the layout was transcribed from.
    pub fn headers(self) -> &'static str {
        match self {
            Minor::V3_11 => v3_11::HEADERS,
            Minor::V3_12 => v3_12::HEADERS,
            Minor::V3_13 => v3_13::HEADERS,
            Minor::V3_14 => v3_14::HEADERS,
            Minor::V3_15 => v3_15::HEADERS,
        }
    }

    /// Where this version's `_Py_DebugOffsets` keeps the fields pyebpf uses
    /// (3.13+).
    pub fn debug_fields(self) -> Option<&'static debug_offsets::Fields> {
        match self {
            Minor::V3_11 | Minor::V3_12 => None,
            Minor::V3_13 => Some(&v3_13::DEBUG_FIELDS),
            Minor::V3_14 => Some(&v3_14::DEBUG_FIELDS),
            Minor::V3_15 => Some(&v3_15::DEBUG_FIELDS),
        }
    }
}

impl fmt::Display for Minor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "3.{}", self.number())
    }
}

/// `_PyRuntimeState`, `PyInterpreterState` and `PyThreadState`: the way from
/// `_PyRuntime` to every thread and its current frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThreadsLayout {
    /// `_PyRuntimeState.interpreters.head`.
    pub runtime_interpreters_head: u64,
    /// `PyInterpreterState.next`.
    pub interp_next: u64,
    /// `PyInterpreterState.threads.head`.
    pub interp_threads_head: u64,
    /// `PyThreadState.next`.
    pub tstate_next: u64,
    /// `PyThreadState.thread_id` (a `pthread_t`: the thread pointer).
    pub tstate_thread_id: u64,
    /// `PyThreadState.cframe` (3.11, 3.12) or `.current_frame` (3.13+).
    pub tstate_frame: u64,
    /// `_PyCFrame.current_frame` where the thread state points at a C frame.
    pub cframe_frame: Option<u64>,
}

/// `_PyInterpreterFrame`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLayout {
    /// `f_code` (3.11, 3.12) or `f_executable` (3.13+).
    pub code: u64,
    pub previous: u64,
    /// `prev_instr` (3.11, 3.12) or `instr_ptr` (3.13+).
    pub instr: u64,
    pub owner: u64,
    /// The first `owner` value of an interpreter boundary frame (3.12+'s
    /// C-stack entry frame), if the version has one.
    pub owner_boundary: Option<u8>,
    /// The largest valid `owner`.
    pub owner_max: u8,
    /// 3.11's `is_entry` byte, marking the first frame an eval-loop
    /// activation runs; `None` where activations start with a boundary
    /// frame instead (3.12+).
    pub is_entry: Option<u64>,
    /// Tag bits of `f_executable` when it is a `_PyStackRef` (3.14+).
    pub code_tag_bits: u32,
}

/// `PyCodeObject` (and the `PyObject`/`PyVarObject` header it starts with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeLayout {
    pub ob_type: u64,
    /// `ob_size`: length of the bytecode in code units.
    pub ob_size: u64,
    pub flags: u64,
    pub firstlineno: u64,
    pub filename: u64,
    pub qualname: u64,
    pub linetable: u64,
    /// `co_code_adaptive`, which is also `PyCode_Type.tp_basicsize`.
    pub adaptive: u64,
    /// `co_flags` bits that mark an interpreter shim (3.13+'s `__init__`
    /// cleanup code object), whose frames are never shown.
    pub shim_flags: u32,
    /// Per word of the checksummed header (`CODE_READ_START..+64`), the
    /// bits of fields that never change after creation.
    pub checksum_masks: [u64; CODE_READ_WORDS],
}

/// `PyASCIIObject`, `PyCompactUnicodeObject`, `PyUnicodeObject` (PEP 393).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StrLayout {
    pub length: u64,
    pub state: u64,
    /// `sizeof(PyASCIIObject)`: where compact ASCII data starts.
    pub ascii_data: u64,
    /// `sizeof(PyCompactUnicodeObject)`: where other compact data starts,
    /// and where a legacy string keeps its data pointer.
    pub compact_data: u64,
}

/// `PyBytesObject`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BytesLayout {
    pub ob_size: u64,
    pub ob_sval: u64,
}

/// How a thread's `PyThreadState` stays reachable after it releases the GIL:
/// the gilstate binding (`_Py_tss_tstate`, which 3.12+ also has, is cleared
/// on release and would lose exactly those threads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gilstate {
    /// The pthread key in `_PyRuntime`'s `Py_tss_t autoTSSkey`, at this
    /// offset in the version's headers (searched for if a patch moved it).
    TssKey { runtime_offset: u64 },
    /// The `_Py_tss_gilstate` thread-local (3.15+), found by decoding
    /// `PyGILState_GetThisThreadState`.
    ThreadLocal,
}

/// Where the GIL's state (`struct _gil_runtime_state`: the flag, the
/// condition variables and mutexes its waiters block on) is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GilLayout {
    /// Inside `_PyRuntime` (3.11: `_PyRuntime.ceval.gil`), at `offset`.
    Runtime { offset: u64, size: u64 },
    /// Pointed at by the main interpreter's `ceval.gil` (3.12+, one GIL
    /// per interpreter; the main one's is its own `_gil`), at `pointer` in
    /// `PyInterpreterState`.
    Interpreter { pointer: u64, size: u64 },
}

/// `sizeof(struct _gil_runtime_state)` of every default (GIL) build from
/// 3.11 on: interval, last_holder, locked, switch_number, then two
/// `pthread_cond_t` (48 bytes) and two `pthread_mutex_t` (40 bytes).
pub const GIL_STATE_SIZE: u64 = 208;

/// Everything pyebpf reads in one interpreter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub minor: Minor,
    pub threads: ThreadsLayout,
    pub frame: FrameLayout,
    pub code: CodeLayout,
    pub string: StrLayout,
    pub bytes: BytesLayout,
    /// `PyTypeObject.tp_basicsize`.
    pub type_basicsize: u64,
    pub gilstate: Gilstate,
    pub gil: GilLayout,
}

/// Every checksum word taken whole: no run-time field in the header.
pub const CHECKSUM_ALL: [u64; CODE_READ_WORDS] = [u64::MAX; CODE_READ_WORDS];

/// Why a layout cannot be handed to the walker.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error(
        "{what} at offset {offset} is beyond what the walker reads per {object} ({limit} bytes)"
    )]
    OutOfReach {
        what: &'static str,
        offset: u64,
        object: &'static str,
        limit: u64,
    },
    #[error("the {object}'s {what} is not word-aligned (the walker loads whole words)")]
    Misaligned {
        what: &'static str,
        object: &'static str,
    },
}

fn fits(
    what: &'static str,
    object: &'static str,
    offset: u64,
    len: u64,
    limit: u64,
) -> Result<u8, LayoutError> {
    match u8::try_from(offset) {
        Ok(o) if offset + len <= limit => Ok(o),
        _ => Err(LayoutError::OutOfReach {
            what,
            offset,
            object,
            limit,
        }),
    }
}

impl Layout {
    /// The offsets the BPF walker follows for this layout, or why they do
    /// not fit in what it reads.
    pub fn walker(&self) -> Result<PyLayout, LayoutError> {
        use profiler_common::{CODE_READ_LEN, FRAME_READ_LEN};
        let frame_len = FRAME_READ_LEN as u64;
        let t = &self.threads;
        let f = &self.frame;
        let c = &self.code;
        let small = |what: &'static str, offset: u64| {
            u16::try_from(offset)
                .ok()
                .filter(|&o| o != NO_CFRAME)
                .ok_or(LayoutError::OutOfReach {
                    what,
                    offset,
                    object: "structure",
                    limit: u64::from(NO_CFRAME),
                })
        };
        let flags = c
            .flags
            .checked_sub(CODE_READ_START)
            .ok_or(LayoutError::OutOfReach {
                what: "co_flags",
                offset: c.flags,
                object: "code header",
                limit: CODE_READ_START + CODE_READ_LEN as u64,
            })?;
        let layout = PyLayout {
            tstate_thread_id: small("PyThreadState.thread_id", t.tstate_thread_id)?,
            tstate_frame: small("PyThreadState frame pointer", t.tstate_frame)?,
            cframe_frame: match t.cframe_frame {
                Some(o) => small("_PyCFrame.current_frame", o)?,
                None => NO_CFRAME,
            },
            code_adaptive: small("co_code_adaptive", c.adaptive)?,
            frame_code: fits("frame code pointer", "frame", f.code, 8, frame_len)?,
            frame_previous: fits("frame previous", "frame", f.previous, 8, frame_len)?,
            frame_instr: fits("frame instruction pointer", "frame", f.instr, 8, frame_len)?,
            frame_owner: fits("frame owner", "frame", f.owner, 1, frame_len)?,
            owner_boundary: f.owner_boundary.unwrap_or(NO_BOUNDARY_OWNER),
            owner_max: f.owner_max,
            code_flags: fits("co_flags", "code header", flags, 4, CODE_READ_LEN as u64)?,
            frame_is_entry: match f.is_entry {
                Some(o) => fits("frame is_entry", "frame", o, 1, frame_len)?,
                None => profiler_common::NO_ENTRY_FLAG,
            },
            shim_flags: c.shim_flags,
            code_tag_bits: f.code_tag_bits,
            checksum_masks: c.checksum_masks,
        };
        // Whole words where the walker loads words.
        layout.check().map_err(|e| {
            let (what, object) = match e {
                profiler_common::LayoutError::FrameField(what) => (what, "frame"),
                profiler_common::LayoutError::CodeField(what) => (what, "code header"),
            };
            LayoutError::Misaligned { what, object }
        })?;
        Ok(layout)
    }

    /// Bytes of a code object read at once when symbolising: the header up
    /// to the first code units.
    pub fn code_header_len(&self) -> usize {
        (self.code.adaptive + 8) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_version_fits_the_walker() {
        for m in Minor::ALL {
            let l = m.header_layout();
            assert_eq!(l.minor, m);
            let w = l.walker().unwrap_or_else(|e| panic!("{m}: {e}"));
            w.check().unwrap();
            assert_eq!(u64::from(w.tstate_thread_id), l.threads.tstate_thread_id);
            assert_eq!(Minor::from_minor(m.number()), Some(m));
            assert_eq!(m.debug_fields().is_some(), m >= Minor::V3_13, "{m}");
            // The header read covers `ob_size` and `co_firstlineno`, which the
            // checksum must see.
            assert_eq!(l.code.ob_size, CODE_READ_START);
            assert!(l.code.firstlineno + 4 <= CODE_READ_START + 64, "{m}");
        }
        assert_eq!(Minor::from_minor(10), None);
        assert_eq!(Minor::from_minor(16), None);
    }

    #[test]
    fn out_of_reach_fields_are_refused() {
        let mut l = Minor::V3_14.header_layout();
        l.frame.owner = 80;
        let e = l.walker().unwrap_err();
        assert_eq!(
            e.to_string(),
            "frame owner at offset 80 is beyond what the walker reads per frame (80 bytes)"
        );
        let mut l = Minor::V3_14.header_layout();
        l.code.flags = 8;
        assert!(l.walker().is_err());
        let mut l = Minor::V3_14.header_layout();
        l.threads.tstate_frame = 70_000;
        assert!(l.walker().is_err());
        let mut l = Minor::V3_14.header_layout();
        l.frame.previous = 12;
        assert_eq!(
            l.walker().unwrap_err().to_string(),
            "the frame's previous is not word-aligned (the walker loads whole words)"
        );
    }
}
