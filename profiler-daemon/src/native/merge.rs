//! Merging native and Python frames into one stack.
//!
//! Each activation of CPython's eval loop (`_PyEval_EvalFrameDefault`) on
//! the native stack runs several Python frames: the run from the newest one
//! down to and including the next *entry* frame (3.11: the frame's
//! `is_entry`; 3.12+: the frame just above an interpreter shim frame, the
//! one owned by the C stack that each activation pushes first). Both stacks
//! are leaf first, so the n-th activation from the leaf runs the n-th run.
//! Native frames between activations (`PyObject_Call`, C extensions) keep
//! their place. When the counts differ, the pairing is kept only where a
//! truncated side explains it; otherwise both stacks are returned unmerged
//! behind a [`Marker::Mismatch`], never mis-assigned.
//!
//! Pairing by stack address, where both sides give one, needs no names:
//! each activation keeps an object on its own C frame (3.12+: the entry
//! shim frame; 3.11: its `_PyCFrame`), so the run whose entry frame carries
//! that object's address (its *anchor*) belongs to the native frame whose
//! stack range holds it. This also finds activations of an eval loop that
//! has no name (Debian sid's LTO builds run it in an unnamed local clone).
use std::fmt;

/// A native frame, as the merge sees it.
pub trait NativeFrameKind {
    /// An activation of the eval loop.
    fn is_eval_loop(&self) -> bool;
    /// The frame's stack pointer (see [`super::unwind::NativeFrame::sp`]),
    /// if known.
    fn stack_pointer(&self) -> Option<u64> {
        None
    }
}

/// A Python frame, as the merge sees it.
pub trait PythonFrameKind {
    /// The first (oldest) frame of an eval-loop activation.
    fn is_entry(&self) -> bool;
    /// On an entry frame: the address, on the C stack, of the object its
    /// activation keeps there (3.12+: the shim frame just older than this
    /// frame; 3.11: the `_PyCFrame` of the activation), if recorded.
    fn anchor(&self) -> Option<u64> {
        None
    }
}

impl NativeFrameKind
    for (
        super::unwind::NativeFrame,
        std::sync::Arc<super::user::NativeSymbol>,
    )
{
    fn is_eval_loop(&self) -> bool {
        self.1.is_eval_loop()
    }
    fn stack_pointer(&self) -> Option<u64> {
        Some(self.0.sp)
    }
}

impl NativeFrameKind for super::user::NativeSymbol {
    fn is_eval_loop(&self) -> bool {
        super::user::NativeSymbol::is_eval_loop(self)
    }
}

impl<T: NativeFrameKind + ?Sized> NativeFrameKind for std::sync::Arc<T> {
    fn is_eval_loop(&self) -> bool {
        (**self).is_eval_loop()
    }
}

/// A stand-in for frames that are not there, shown as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Marker {
    /// An eval-loop activation whose Python frames are not in the sample
    /// (the Python stack was cut short).
    PythonFramesMissing,
    /// The Python frames that follow are older than the last native frame
    /// found (the native stack was cut short).
    NativeFramesMissing,
    /// Activations and Python runs do not pair up: the native stack came
    /// before this marker, the Python stack follows it, unmerged.
    Mismatch {
        eval_activations: usize,
        python_runs: usize,
    },
}

impl fmt::Display for Marker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Marker::PythonFramesMissing => f.write_str("[python frames missing]"),
            Marker::NativeFramesMissing => f.write_str("[native frames missing]"),
            Marker::Mismatch {
                eval_activations,
                python_runs,
            } => write!(
                f,
                "[unmerged: {eval_activations} eval loop activations, {python_runs} python runs]"
            ),
        }
    }
}

/// One frame of a merged stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merged<'a, N, P> {
    Native(&'a N),
    Python(&'a P),
    Marker(Marker),
}

/// One side of the merge: its frames, leaf first, and whether they reach
/// the root (an unwind that ended at the outermost frame; a Python walk
/// that was not cut at its depth limit).
#[derive(Clone, Copy, Debug)]
pub struct Side<'a, T> {
    pub frames: &'a [T],
    pub complete: bool,
}

/// The merged stack, leaf first: paired by anchors when every run has one
/// and every native frame its stack pointer, else by eval-loop names.
pub fn merge<'a, N: NativeFrameKind, P: PythonFrameKind>(
    native: Side<'a, N>,
    python: Side<'a, P>,
) -> Vec<Merged<'a, N, P>> {
    let runs: Vec<&'a [P]> = python
        .frames
        .split_inclusive(|p| p.is_entry())
        .filter(|r| !r.is_empty())
        .collect();
    let by_anchor = anchored(native.frames, &runs);
    let mut out = Vec::with_capacity(native.frames.len() + python.frames.len() + 1);
    let mismatch = |out: &mut Vec<Merged<'a, N, P>>, activations: usize| {
        out.clear();
        out.extend(native.frames.iter().map(Merged::Native));
        out.push(Merged::Marker(Marker::Mismatch {
            eval_activations: activations,
            python_runs: runs.len(),
        }));
        out.extend(python.frames.iter().map(Merged::Python));
    };
    let named = native.frames.iter().filter(|n| n.is_eval_loop()).count();
    match by_anchor {
        Some(Some(at)) => {
            // Runs whose anchor is older than the last frame unwound.
            let beyond = at.iter().filter(|i| i.is_none()).count();
            if beyond > 0 && native.complete {
                mismatch(&mut out, at.len() - beyond);
                return out;
            }
            let mut assigned = at.iter().zip(&runs).filter_map(|(i, r)| Some(((*i)?, *r)));
            let mut next = assigned.next();
            for (i, n) in native.frames.iter().enumerate() {
                match next {
                    Some((at, run)) if at == i => {
                        out.extend(run.iter().map(Merged::Python));
                        next = assigned.next();
                    }
                    // An activation without its run: only a Python stack
                    // cut short explains it.
                    _ if n.is_eval_loop() && next.is_none() && !python.complete => {
                        out.push(Merged::Marker(Marker::PythonFramesMissing))
                    }
                    _ if n.is_eval_loop() => {
                        mismatch(&mut out, at.len() - beyond);
                        return out;
                    }
                    _ => out.push(Merged::Native(n)),
                }
            }
            if beyond > 0 {
                out.push(Merged::Marker(Marker::NativeFramesMissing));
                let rest = runs[runs.len() - beyond..].iter();
                out.extend(rest.flat_map(|r| r.iter()).map(Merged::Python));
            }
            return out;
        }
        Some(None) => {
            mismatch(&mut out, named);
            return out;
        }
        None => {}
    }
    let explained = named == runs.len()
        || (named > runs.len() && !python.complete)
        || (named < runs.len() && !native.complete);
    if !explained {
        mismatch(&mut out, named);
        return out;
    }
    let mut next_run = runs.iter();
    for n in native.frames {
        if !n.is_eval_loop() {
            out.push(Merged::Native(n));
            continue;
        }
        match next_run.next() {
            Some(run) => out.extend(run.iter().map(Merged::Python)),
            None => out.push(Merged::Marker(Marker::PythonFramesMissing)),
        }
    }
    let rest: Vec<&&[P]> = next_run.collect();
    if !rest.is_empty() {
        out.push(Merged::Marker(Marker::NativeFramesMissing));
        out.extend(rest.into_iter().flat_map(|r| r.iter()).map(Merged::Python));
    }
    out
}

/// The native frame of each run's activation, from the anchors: `None`
/// (outer) when a run has no anchor (or one below the leaf) or a native
/// frame no stack pointer; `Some(None)` when they do not fit one stack
/// (out of order); else per run, `None` past the last frame unwound.
#[allow(clippy::option_option)]
fn anchored<N: NativeFrameKind, P: PythonFrameKind>(
    native: &[N],
    runs: &[&[P]],
) -> Option<Option<Vec<Option<usize>>>> {
    if runs.is_empty() {
        return None;
    }
    let sps: Vec<u64> = native
        .iter()
        .map(|n| n.stack_pointer())
        .collect::<Option<_>>()?;
    let anchors: Vec<u64> = runs
        .iter()
        .map(|r| r.last()?.anchor())
        .collect::<Option<_>>()?;
    // An anchor below the leaf is not on this stack (3.15's base frame is
    // in the thread state): names must do.
    if anchors.iter().any(|&a| a < sps[0]) {
        return None;
    }
    let mut out = Vec::with_capacity(anchors.len());
    let mut last: Option<usize> = None;
    for a in anchors {
        // The frame whose range [sp, next frame's sp) holds the anchor.
        let i = sps.partition_point(|&sp| sp <= a);
        let at = match i {
            0 => return None,
            // Past the last frame's sp: in it if it is an activation not
            // yet given a run (its upper bound, its CFA, is not known),
            // else older than what was unwound.
            i if i == sps.len() => {
                let n = sps.len() - 1;
                (native[n].is_eval_loop() && last != Some(n)).then_some(n)
            }
            i => Some(i - 1),
        };
        match (at, last, out.last()) {
            // Leaf first: each activation older than the one before.
            (Some(at), Some(prev), _) if at <= prev => return Some(None),
            // Once past the unwound part, every older run is too.
            (Some(_), _, Some(None)) => return Some(None),
            _ => {}
        }
        if at.is_some() {
            last = at;
        }
        out.push(at);
    }
    Some(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct N(&'static str);
    impl NativeFrameKind for N {
        fn is_eval_loop(&self) -> bool {
            self.0 == "_PyEval_EvalFrameDefault"
        }
    }
    struct P(&'static str, bool);
    impl PythonFrameKind for P {
        fn is_entry(&self) -> bool {
            self.1
        }
    }

    const EVAL: &str = "_PyEval_EvalFrameDefault";

    fn show(m: &[Merged<'_, N, P>]) -> Vec<String> {
        m.iter()
            .map(|m| match m {
                Merged::Native(n) => n.0.to_owned(),
                Merged::Python(p) => format!("py:{}", p.0),
                Merged::Marker(k) => k.to_string(),
            })
            .collect()
    }

    fn run(native: &[N], nc: bool, python: &[P], pc: bool) -> Vec<String> {
        show(&merge(
            Side {
                frames: native,
                complete: nc,
            },
            Side {
                frames: python,
                complete: pc,
            },
        ))
    }

    /// A C function called from Python, called from C called from Python:
    /// two activations, each replaced by its run; C frames between stay.
    #[test]
    fn activations_take_their_runs_in_order() {
        let native = [
            N("sha256_update"),
            N("_hashlib_HASH_update"),
            N("cfunction_vectorcall_O"),
            N(EVAL),
            N("_PyEval_Vector"),
            N("list_sort_impl"),
            N(EVAL),
            N("PyEval_EvalCode"),
            N("main"),
        ];
        let python = [
            P("keyfn", true),
            P("digest", false),
            P("handler", false),
            P("<module>", true),
        ];
        assert_eq!(
            run(&native, true, &python, true),
            [
                "sha256_update",
                "_hashlib_HASH_update",
                "cfunction_vectorcall_O",
                "py:keyfn",
                "_PyEval_Vector",
                "list_sort_impl",
                "py:digest",
                "py:handler",
                "py:<module>",
                "PyEval_EvalCode",
                "main",
            ]
        );
    }

    #[test]
    fn no_python_no_activation_is_the_native_stack() {
        let native = [N("epoll_wait"), N("main")];
        assert_eq!(run(&native, true, &[], true), ["epoll_wait", "main"]);
        let python = [P("f", true)];
        assert_eq!(
            run(&[], false, &python, true),
            ["[native frames missing]", "py:f"]
        );
    }

    /// The native walk stopped early (stack copy ended): the older runs go
    /// after a marker, in order.
    #[test]
    fn short_native_stack_keeps_older_runs_after_a_marker() {
        let native = [
            N("clock_nanosleep"),
            N("time_sleep"),
            N(EVAL),
            N("_PyEval_Vector"),
        ];
        let python = [P("inner", true), P("outer", false), P("<module>", true)];
        assert_eq!(
            run(&native, false, &python, true),
            [
                "clock_nanosleep",
                "time_sleep",
                "py:inner",
                "_PyEval_Vector",
                "[native frames missing]",
                "py:outer",
                "py:<module>",
            ]
        );
    }

    /// The Python walk was cut at its depth limit: older activations say
    /// their frames are missing.
    #[test]
    fn short_python_stack_marks_the_activations_without_frames() {
        let native = [
            N("select"),
            N(EVAL),
            N("PyObject_Call"),
            N(EVAL),
            N("PyObject_Call"),
            N(EVAL),
            N("main"),
        ];
        let python = [P("wait", true), P("loop", false)];
        assert_eq!(
            run(&native, true, &python, false),
            [
                "select",
                "py:wait",
                "PyObject_Call",
                "py:loop",
                "PyObject_Call",
                "[python frames missing]",
                "main"
            ]
        );
        // The same stacks, the Python one complete: unexplained.
        assert_eq!(
            run(&native, true, &python, true)[7],
            "[unmerged: 3 eval loop activations, 2 python runs]"
        );
    }

    /// Complete stacks that do not pair up (an activation still entering,
    /// an eval loop we could not name, a custom frame evaluator): nothing is
    /// assigned, the marker says what did not match.
    #[test]
    fn unexplained_mismatch_is_not_merged() {
        let native = [N("x"), N(EVAL), N(EVAL), N("main")];
        let python = [P("f", true)];
        assert_eq!(
            run(&native, true, &python, true),
            [
                "x",
                EVAL,
                EVAL,
                "main",
                "[unmerged: 2 eval loop activations, 1 python runs]",
                "py:f"
            ]
        );
        // More runs than activations with a complete native stack.
        let native = [N(EVAL), N("main")];
        let python = [P("f", true), P("g", true)];
        assert_eq!(
            run(&native, true, &python, false),
            [
                EVAL,
                "main",
                "[unmerged: 1 eval loop activations, 2 python runs]",
                "py:f",
                "py:g"
            ]
        );
        // A short native stack does not explain more activations.
        let native = [N(EVAL), N(EVAL)];
        assert_eq!(
            run(&native, false, &python[..1], true),
            [
                EVAL,
                EVAL,
                "[unmerged: 2 eval loop activations, 1 python runs]",
                "py:f"
            ]
        );
    }

    /// A Python stack whose last run has no entry frame (cut short) still
    /// pairs with the activation that runs it.
    #[test]
    fn last_run_without_entry_pairs_with_its_activation() {
        let native = [N("read"), N(EVAL), N("PyObject_Call"), N(EVAL)];
        let python = [P("recv", true), P("serve", false), P("main", false)];
        assert_eq!(
            run(&native, false, &python, false),
            ["read", "py:recv", "PyObject_Call", "py:serve", "py:main"]
        );
    }

    /// Frames with stack pointers and anchors.
    struct NA(&'static str, u64);
    impl NativeFrameKind for NA {
        fn is_eval_loop(&self) -> bool {
            self.0 == EVAL
        }
        fn stack_pointer(&self) -> Option<u64> {
            Some(self.1)
        }
    }
    struct PA(&'static str, Option<u64>);
    impl PythonFrameKind for PA {
        fn is_entry(&self) -> bool {
            self.1.is_some()
        }
        fn anchor(&self) -> Option<u64> {
            self.1
        }
    }

    fn run_anchored(native: &[NA], nc: bool, python: &[PA], pc: bool) -> Vec<String> {
        merge(
            Side {
                frames: native,
                complete: nc,
            },
            Side {
                frames: python,
                complete: pc,
            },
        )
        .iter()
        .map(|m| match m {
            Merged::Native(n) => n.0.to_owned(),
            Merged::Python(p) => format!("py:{}", p.0),
            Merged::Marker(k) => k.to_string(),
        })
        .collect()
    }

    /// An eval loop without a name (LTO's unnamed clone): the anchors find
    /// its activations by stack address.
    #[test]
    fn anchors_pair_runs_with_unnamed_activations() {
        let native = [
            NA("read", 100),
            NA("?", 200),
            NA("?", 300),
            NA("PyObject_Call", 400),
            NA("?", 500),
            NA("main", 600),
        ];
        let python = [PA("f", Some(350)), PA("g", None), PA("h", Some(520))];
        assert_eq!(
            run_anchored(&native, true, &python, true),
            ["read", "?", "py:f", "PyObject_Call", "py:g", "py:h", "main"]
        );
    }

    #[test]
    fn anchors_that_do_not_fit_the_stack_are_not_merged() {
        let native = [
            NA("read", 100),
            NA(EVAL, 200),
            NA(EVAL, 300),
            NA("main", 400),
        ];
        // Below the leaf: not on this stack, names pair them.
        let below = [PA("f", Some(50)), PA("g", Some(350))];
        assert_eq!(
            run_anchored(&native, true, &below, true),
            ["read", "py:f", "py:g", "main"]
        );
        // Out of order: the newer run anchored in the older frame.
        let swapped = [PA("f", Some(310)), PA("g", Some(210))];
        assert_eq!(
            run_anchored(&native, true, &swapped, true)[4],
            "[unmerged: 2 eval loop activations, 2 python runs]"
        );
        // A named activation left without a run, the Python stack complete.
        let one = [PA("f", Some(210))];
        assert_eq!(
            run_anchored(&native, true, &one, true)[4],
            "[unmerged: 1 eval loop activations, 1 python runs]"
        );
        // ... or cut short: its frames are missing.
        assert_eq!(
            run_anchored(&native, true, &one, false),
            ["read", "py:f", "[python frames missing]", "main"]
        );
    }

    /// The native walk stopped early: the last frame unwound takes the
    /// first run anchored past its sp if it is an activation; older runs
    /// follow a marker.
    #[test]
    fn anchors_past_a_short_native_stack() {
        let native = [
            NA("read", 100),
            NA(EVAL, 200),
            NA("PyObject_Call", 300),
            NA(EVAL, 400),
        ];
        let python = [PA("f", Some(250)), PA("g", Some(450)), PA("h", Some(900))];
        assert_eq!(
            run_anchored(&native, false, &python, true),
            [
                "read",
                "py:f",
                "PyObject_Call",
                "py:g",
                "[native frames missing]",
                "py:h"
            ]
        );
        // A complete native stack cannot have runs past its root.
        assert_eq!(
            run_anchored(&native, true, &python, true)[4],
            "[unmerged: 2 eval loop activations, 3 python runs]"
        );
    }
}
