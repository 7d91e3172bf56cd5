//! Queries over parsed folded stacks (`(frames root first, value)`), for
//! the tests of profiles whose values are nanoseconds.

pub fn secs(ns: u64) -> f64 {
    ns as f64 / 1e9
}

/// The sum of the values of the stacks that `keep` accepts.
pub fn time_of(stacks: &[(Vec<String>, u64)], keep: impl Fn(&[String]) -> bool) -> u64 {
    stacks.iter().filter(|(s, _)| keep(s)).map(|(_, v)| v).sum()
}

pub fn has(s: &[String], frame: &str) -> bool {
    s.iter().any(|f| f == frame)
}

pub fn has_prefix(s: &[String], prefix: &str) -> bool {
    s.iter().any(|f| f.starts_with(prefix))
}

/// The last Python frame (before kernel and synthetic frames).
pub fn python_leaf(s: &[String]) -> Option<&str> {
    s.iter()
        .rev()
        .find(|f| !f.starts_with('['))
        .map(String::as_str)
}
