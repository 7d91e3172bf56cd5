//! `_Py_DebugOffsets`: the layout a CPython 3.13+ interpreter publishes
//! about itself, as the first field of `_PyRuntime`.
//!
//! It is an 8-byte cookie (`xdebugpy`) followed by `uint64_t` fields:
//! `version` (`PY_VERSION_HEX`), `free_threaded`, then groups of offsets. The
//! groups grow between minor versions, so where each field sits is part of
//! each version's module ([`Fields`]). The published offsets override the
//! header defaults; offsets pyebpf needs but the interpreter does not publish
//! are derived from published neighbours, and a published layout that moves
//! them in a way pyebpf cannot follow is refused with the reason.
use super::{Layout, Minor};

/// The cookie at the start of `_Py_DebugOffsets`.
pub const COOKIE: &[u8; 8] = b"xdebugpy";

/// Where one version's `_Py_DebugOffsets` keeps each field pyebpf uses, as
/// indexes of `uint64_t` slots (the cookie is slot 0).
#[derive(Clone, Copy, Debug)]
pub struct Fields {
    /// Slots in the whole structure.
    pub slots: usize,
    pub runtime_interpreters_head: usize,
    pub interp_next: usize,
    pub interp_threads_head: usize,
    pub tstate_next: usize,
    pub tstate_current_frame: usize,
    pub tstate_thread_id: usize,
    pub frame_size: usize,
    pub frame_previous: usize,
    pub frame_executable: usize,
    pub frame_instr_ptr: usize,
    pub frame_owner: usize,
    pub code_size: usize,
    pub code_filename: usize,
    pub code_qualname: usize,
    pub code_linetable: usize,
    pub code_firstlineno: usize,
    pub code_argcount: usize,
    pub code_adaptive: usize,
    pub ob_type: usize,
    pub type_basicsize: Option<usize>,
    pub bytes_ob_size: usize,
    pub bytes_ob_sval: usize,
    pub str_state: usize,
    pub str_length: usize,
    pub str_ascii_size: usize,
    pub str_compact_size: Option<usize>,
}

const VERSION: usize = 1;
const FREE_THREADED: usize = 2;
/// Most slots any known version has, read at once (3.15 has 111).
pub const MAX_SLOTS: usize = 160;

/// What the interpreter says about itself before any offset is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// `PY_VERSION_HEX`.
    pub version: u32,
    pub free_threaded: bool,
}

/// Why the published offsets cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DebugOffsetsError {
    #[error("_PyRuntime does not start with the _Py_DebugOffsets cookie \"xdebugpy\"")]
    NoCookie,
    #[error("_Py_DebugOffsets is {got} bytes, shorter than the {want} its version has")]
    Short { got: usize, want: usize },
    #[error("_Py_DebugOffsets.{field} is {value}, not a plausible offset")]
    Implausible { field: &'static str, value: u64 },
    #[error(
        "_Py_DebugOffsets moves {field} to {published} (the {minor} headers have {expected}): \
         pyebpf also reads unpublished fields next to it and cannot tell where they went"
    )]
    Moved {
        field: &'static str,
        minor: Minor,
        published: u64,
        expected: u64,
    },
}

/// The cookie, version and free-threading flag at the start of `raw` (the
/// first bytes of `_PyRuntime`).
pub fn header(raw: &[u8]) -> Result<Header, DebugOffsetsError> {
    if raw.len() < 24 {
        return Err(DebugOffsetsError::Short {
            got: raw.len(),
            want: 24,
        });
    }
    if &raw[..8] != COOKIE {
        return Err(DebugOffsetsError::NoCookie);
    }
    Ok(Header {
        version: slot(raw, VERSION) as u32,
        free_threaded: slot(raw, FREE_THREADED) != 0,
    })
}

fn slot(raw: &[u8], i: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&raw[i * 8..i * 8 + 8]);
    u64::from_le_bytes(w)
}

/// A field that differs from the version's headers, for the logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Moved {
    pub field: &'static str,
    pub headers: u64,
    pub published: u64,
}

/// `defaults` (the version's header layout) with every offset the process
/// publishes in `raw` (its `_Py_DebugOffsets`, at least `fields.slots`
/// slots), and the fields whose published offset differs from the headers.
pub fn apply(
    defaults: &Layout,
    fields: &Fields,
    raw: &[u8],
) -> Result<(Layout, Vec<Moved>), DebugOffsetsError> {
    header(raw)?;
    if raw.len() < fields.slots * 8 {
        return Err(DebugOffsetsError::Short {
            got: raw.len(),
            want: fields.slots * 8,
        });
    }
    let mut l = *defaults;
    let mut moved = Vec::new();
    // Every offset fits in a structure of a few tens of kB (PyInterpreterState
    // is the largest, about 7 kB of it before `threads`).
    let mut take = |field: &'static str, i: usize, dst: &mut u64| {
        let v = slot(raw, i);
        if v >= 1 << 20 {
            return Err(DebugOffsetsError::Implausible { field, value: v });
        }
        if v != *dst {
            moved.push(Moved {
                field,
                headers: *dst,
                published: v,
            });
            *dst = v;
        }
        Ok(())
    };
    let t = &mut l.threads;
    take(
        "runtime_state.interpreters_head",
        fields.runtime_interpreters_head,
        &mut t.runtime_interpreters_head,
    )?;
    take(
        "interpreter_state.next",
        fields.interp_next,
        &mut t.interp_next,
    )?;
    take(
        "interpreter_state.threads_head",
        fields.interp_threads_head,
        &mut t.interp_threads_head,
    )?;
    take("thread_state.next", fields.tstate_next, &mut t.tstate_next)?;
    take(
        "thread_state.current_frame",
        fields.tstate_current_frame,
        &mut t.tstate_frame,
    )?;
    take(
        "thread_state.thread_id",
        fields.tstate_thread_id,
        &mut t.tstate_thread_id,
    )?;
    let f = &mut l.frame;
    take(
        "interpreter_frame.previous",
        fields.frame_previous,
        &mut f.previous,
    )?;
    take(
        "interpreter_frame.executable",
        fields.frame_executable,
        &mut f.code,
    )?;
    take(
        "interpreter_frame.instr_ptr",
        fields.frame_instr_ptr,
        &mut f.instr,
    )?;
    take("interpreter_frame.owner", fields.frame_owner, &mut f.owner)?;
    let c = &mut l.code;
    take(
        "code_object.filename",
        fields.code_filename,
        &mut c.filename,
    )?;
    take(
        "code_object.qualname",
        fields.code_qualname,
        &mut c.qualname,
    )?;
    take(
        "code_object.linetable",
        fields.code_linetable,
        &mut c.linetable,
    )?;
    take(
        "code_object.co_code_adaptive",
        fields.code_adaptive,
        &mut c.adaptive,
    )?;
    take("pyobject.ob_type", fields.ob_type, &mut c.ob_type)?;
    let mut firstlineno = c.firstlineno;
    take(
        "code_object.firstlineno",
        fields.code_firstlineno,
        &mut firstlineno,
    )?;
    // co_flags is not published; it sits right before co_argcount in every
    // version. The checksummed header must not move: it holds co_flags,
    // co_firstlineno and the fields the checksum relies on never changing.
    let mut argcount = c.flags + 4;
    take("code_object.argcount", fields.code_argcount, &mut argcount)?;
    for (field, published, expected) in [
        ("code_object.argcount", argcount, c.flags + 4),
        ("code_object.firstlineno", firstlineno, c.firstlineno),
    ] {
        if published != expected {
            return Err(DebugOffsetsError::Moved {
                field,
                minor: defaults.minor,
                published,
                expected,
            });
        }
    }
    if let Some(i) = fields.type_basicsize {
        take("type_object.tp_basicsize", i, &mut l.type_basicsize)?;
    }
    take(
        "bytes_object.ob_size",
        fields.bytes_ob_size,
        &mut l.bytes.ob_size,
    )?;
    take(
        "bytes_object.ob_sval",
        fields.bytes_ob_sval,
        &mut l.bytes.ob_sval,
    )?;
    let s = &mut l.string;
    take("unicode_object.state", fields.str_state, &mut s.state)?;
    take("unicode_object.length", fields.str_length, &mut s.length)?;
    let ascii_before = s.ascii_data;
    take(
        "unicode_object.asciiobject_size",
        fields.str_ascii_size,
        &mut s.ascii_data,
    )?;
    match fields.str_compact_size {
        Some(i) => take(
            "unicode_object.compactunicodeobject_size",
            i,
            &mut s.compact_data,
        )?,
        // PyCompactUnicodeObject is PyASCIIObject plus `utf8_length` and
        // `utf8`: it moves with it.
        None => s.compact_data = s.compact_data - ascii_before + s.ascii_data,
    }
    // The structure sizes are sanity checks: every field read lies inside.
    let frame_size = slot(raw, fields.frame_size);
    let code_size = slot(raw, fields.code_size);
    for (field, offset, len, size) in [
        ("interpreter_frame.owner", l.frame.owner, 1, frame_size),
        ("interpreter_frame.instr_ptr", l.frame.instr, 8, frame_size),
        (
            "interpreter_frame.previous",
            l.frame.previous,
            8,
            frame_size,
        ),
        (
            "code_object.co_code_adaptive",
            l.code.adaptive,
            0,
            code_size,
        ),
        ("code_object.linetable", l.code.linetable, 8, code_size),
    ] {
        if offset + len > size {
            return Err(DebugOffsetsError::Implausible {
                field,
                value: offset,
            });
        }
    }
    Ok((l, moved))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The `_Py_DebugOffsets` of `minor` as its headers' interpreter
    /// publishes it: every field pyebpf reads set from the header layout.
    pub fn published(minor: Minor) -> Vec<u8> {
        let f = minor.debug_fields().expect("3.13+");
        let l = minor.header_layout();
        let mut w = vec![0u64; f.slots];
        w[VERSION] = (0x0300_00f0 | (u32::from(minor.number()) << 16)).into();
        let t = l.threads;
        for (i, v) in [
            (f.runtime_interpreters_head, t.runtime_interpreters_head),
            (f.interp_next, t.interp_next),
            (f.interp_threads_head, t.interp_threads_head),
            (f.tstate_next, t.tstate_next),
            (f.tstate_current_frame, t.tstate_frame),
            (f.tstate_thread_id, t.tstate_thread_id),
            (f.frame_size, if minor >= Minor::V3_14 { 88 } else { 80 }),
            (f.frame_previous, l.frame.previous),
            (f.frame_executable, l.frame.code),
            (f.frame_instr_ptr, l.frame.instr),
            (f.frame_owner, l.frame.owner),
            (f.code_size, l.code.adaptive + 8),
            (f.code_filename, l.code.filename),
            (f.code_qualname, l.code.qualname),
            (f.code_linetable, l.code.linetable),
            (f.code_firstlineno, l.code.firstlineno),
            (f.code_argcount, l.code.flags + 4),
            (f.code_adaptive, l.code.adaptive),
            (f.ob_type, l.code.ob_type),
            (f.bytes_ob_size, l.bytes.ob_size),
            (f.bytes_ob_sval, l.bytes.ob_sval),
            (f.str_state, l.string.state),
            (f.str_length, l.string.length),
            (f.str_ascii_size, l.string.ascii_data),
        ] {
            w[i] = v;
        }
        if let Some(i) = f.type_basicsize {
            w[i] = l.type_basicsize;
        }
        if let Some(i) = f.str_compact_size {
            w[i] = l.string.compact_data;
        }
        let mut raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        raw[..8].copy_from_slice(COOKIE);
        raw
    }

    fn put(raw: &mut [u8], i: usize, v: u64) {
        raw[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn headers_and_publication_agree() {
        for minor in [Minor::V3_13, Minor::V3_14, Minor::V3_15] {
            let raw = published(minor);
            let h = header(&raw).unwrap();
            assert_eq!(h.version >> 16, 0x0300 | u32::from(minor.number()));
            assert!(!h.free_threaded);
            let (l, moved) = apply(&minor.header_layout(), minor.debug_fields().unwrap(), &raw)
                .unwrap_or_else(|e| panic!("{minor}: {e}"));
            assert_eq!(l, minor.header_layout(), "{minor}");
            assert!(moved.is_empty(), "{minor}: {moved:?}");
        }
    }

    /// A patch release that moves `current_frame` and grows the frame keeps
    /// working: the published offsets win.
    #[test]
    fn a_patch_release_that_moves_fields_is_followed() {
        let minor = Minor::V3_14;
        let f = minor.debug_fields().unwrap();
        let mut raw = published(minor);
        put(&mut raw, f.tstate_current_frame, 80);
        put(&mut raw, f.tstate_thread_id, 168);
        put(&mut raw, f.frame_owner, 76);
        put(&mut raw, f.str_ascii_size, 48);
        let (l, moved) = apply(&minor.header_layout(), f, &raw).unwrap();
        assert_eq!(l.threads.tstate_frame, 80);
        assert_eq!(l.threads.tstate_thread_id, 168);
        assert_eq!(l.frame.owner, 76);
        assert_eq!((l.string.ascii_data, l.string.compact_data), (48, 64));
        let names: Vec<_> = moved.iter().map(|m| m.field).collect();
        assert_eq!(
            names,
            [
                "thread_state.current_frame",
                "thread_state.thread_id",
                "interpreter_frame.owner",
                "unicode_object.asciiobject_size"
            ]
        );
        assert_eq!(
            moved[0],
            Moved {
                field: "thread_state.current_frame",
                headers: 72,
                published: 80
            }
        );
        l.walker().unwrap();
    }

    #[test]
    fn what_cannot_be_followed_is_refused() {
        let minor = Minor::V3_13;
        let f = minor.debug_fields().unwrap();
        let d = minor.header_layout();
        let mut raw = published(minor);
        put(&mut raw, f.code_argcount, 60);
        let e = apply(&d, f, &raw).unwrap_err();
        assert_eq!(
            e.to_string(),
            "_Py_DebugOffsets moves code_object.argcount to 60 (the 3.13 headers have 52): \
             pyebpf also reads unpublished fields next to it and cannot tell where they went"
        );
        let mut raw = published(minor);
        put(&mut raw, f.frame_owner, 1 << 40);
        assert!(matches!(
            apply(&d, f, &raw),
            Err(DebugOffsetsError::Implausible {
                field: "interpreter_frame.owner",
                ..
            })
        ));
        // An owner beyond the frame's published size.
        let mut raw = published(minor);
        put(&mut raw, f.frame_owner, 90);
        assert!(apply(&d, f, &raw).is_err());
        // A frame the walker cannot read in one go is refused later, by
        // `Layout::walker`.
        let mut raw = published(minor);
        put(&mut raw, f.frame_size, 200);
        put(&mut raw, f.frame_owner, 120);
        let (l, _) = apply(&d, f, &raw).unwrap();
        assert!(l.walker().is_err());
        let raw = published(minor);
        assert!(matches!(
            apply(&d, f, &raw[..100]),
            Err(DebugOffsetsError::Short { .. })
        ));
        let mut raw = published(minor);
        raw[0] = b'X';
        assert_eq!(apply(&d, f, &raw), Err(DebugOffsetsError::NoCookie));
        assert_eq!(
            header(&raw[..10]).unwrap_err(),
            DebugOffsetsError::Short { got: 10, want: 24 }
        );
    }

    #[test]
    fn free_threaded_flag() {
        let mut raw = published(Minor::V3_14);
        put(&mut raw, FREE_THREADED, 1);
        assert!(header(&raw).unwrap().free_threaded);
    }
}
