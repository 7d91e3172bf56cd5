//! Whether a discovered Python process is profiled: the per-process opt-out
//! (`PYEBPF_DISABLE`), then the configured exclude and include rules.
use std::fmt;

use crate::model::labels::ProcessLabels;

/// A rule that selects processes by their labels (the configuration's rules
/// implement it).
pub trait Matcher {
    fn matches(&self, labels: &ProcessLabels) -> bool;

    /// How the rule reads in logs and in exclusion reasons, if it can say.
    fn describe(&self) -> Option<String> {
        None
    }
}

impl<M: Matcher + ?Sized> Matcher for &M {
    fn matches(&self, labels: &ProcessLabels) -> bool {
        (**self).matches(labels)
    }
    fn describe(&self) -> Option<String> {
        (**self).describe()
    }
}

impl<M: Matcher + ?Sized> Matcher for Box<M> {
    fn matches(&self, labels: &ProcessLabels) -> bool {
        (**self).matches(labels)
    }
    fn describe(&self) -> Option<String> {
        (**self).describe()
    }
}

/// The outcome of [`decide`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Profile,
    /// Not profiled, and why (one line, for logs).
    Excluded(String),
}

impl Decision {
    pub fn is_profile(&self) -> bool {
        matches!(self, Decision::Profile)
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Profile => f.write_str("profiled"),
            Decision::Excluded(why) => write!(f, "excluded: {why}"),
        }
    }
}

/// The reason given when the process itself opted out.
pub const ENV_DISABLED: &str = "PYEBPF_DISABLE is set";

/// Decide whether to profile a process: `env_disabled` (its
/// `PYEBPF_DISABLE`) excludes it; otherwise any matching `exclude` rule
/// excludes it (exclude wins over include); otherwise it is profiled if
/// `include` is empty (everything) or one of its rules matches.
pub fn decide<M: Matcher>(
    include: &[M],
    exclude: &[M],
    labels: &ProcessLabels,
    env_disabled: bool,
) -> Decision {
    if env_disabled {
        return Decision::Excluded(ENV_DISABLED.to_owned());
    }
    if let Some((i, rule)) = exclude.iter().enumerate().find(|(_, r)| r.matches(labels)) {
        return Decision::Excluded(match rule.describe() {
            Some(d) => format!("matches exclude rule #{} ({d})", i + 1),
            None => format!("matches exclude rule #{}", i + 1),
        });
    }
    if include.is_empty() || include.iter().any(|r| r.matches(labels)) {
        Decision::Profile
    } else {
        Decision::Excluded(format!(
            "matches none of the {} include rule{}",
            include.len(),
            if include.len() == 1 { "" } else { "s" }
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Matches processes whose service is the given name.
    struct Service(&'static str);

    impl Matcher for Service {
        fn matches(&self, labels: &ProcessLabels) -> bool {
            labels.service == self.0
        }
    }

    /// Matches processes in a container, and says so.
    struct InContainer;

    impl Matcher for InContainer {
        fn matches(&self, labels: &ProcessLabels) -> bool {
            labels.container_id.is_some()
        }
        fn describe(&self) -> Option<String> {
            Some("container_id is set".into())
        }
    }

    fn labels(service: &str, container: bool) -> ProcessLabels {
        ProcessLabels {
            pid: 42,
            command: "python3".into(),
            service: service.into(),
            container_id: container.then(|| "ab".repeat(32)),
            ..Default::default()
        }
    }

    #[test]
    fn empty_include_means_everything() {
        let none: [Service; 0] = [];
        assert_eq!(
            decide(&none, &none, &labels("web", false), false),
            Decision::Profile
        );
    }

    #[test]
    fn env_disabled_wins() {
        let inc = [Service("web")];
        let d = decide(&inc, &[], &labels("web", false), true);
        assert_eq!(d, Decision::Excluded("PYEBPF_DISABLE is set".into()));
        assert!(!d.is_profile());
        assert_eq!(d.to_string(), "excluded: PYEBPF_DISABLE is set");
    }

    #[test]
    fn include_rules() {
        let inc = [Service("web"), Service("api")];
        assert!(decide(&inc, &[], &labels("web", false), false).is_profile());
        assert!(decide(&inc, &[], &labels("api", false), false).is_profile());
        assert_eq!(
            decide(&inc, &[], &labels("batch", false), false),
            Decision::Excluded("matches none of the 2 include rules".into())
        );
        assert_eq!(
            decide(&inc[..1], &[], &labels("batch", false), false),
            Decision::Excluded("matches none of the 1 include rule".into())
        );
    }

    #[test]
    fn exclude_wins_over_include() {
        let inc = [Service("web")];
        let exc = [Service("batch"), Service("web")];
        assert_eq!(
            decide(&inc, &exc, &labels("web", false), false),
            Decision::Excluded("matches exclude rule #2".into())
        );
        // Exclude with an empty include list.
        assert!(!decide(&[], &exc, &labels("batch", false), false).is_profile());
        assert!(decide(&[], &exc, &labels("other", false), false).is_profile());
    }

    #[test]
    fn trait_objects_and_descriptions() {
        let inc: Vec<Box<dyn Matcher>> = vec![Box::new(Service("web"))];
        let exc: Vec<Box<dyn Matcher>> = vec![Box::new(InContainer)];
        assert!(decide(&inc, &exc, &labels("web", false), false).is_profile());
        assert_eq!(
            decide(&inc, &exc, &labels("web", true), false),
            Decision::Excluded("matches exclude rule #1 (container_id is set)".into())
        );
        // References work too.
        let s = Service("web");
        assert!(decide(&[&s], &[], &labels("web", false), false).is_profile());
    }
}
