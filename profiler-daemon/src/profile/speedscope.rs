//! TODO
use super::Profile;
pub fn write(_p: &Profile, _title: &str, _out: &mut dyn std::io::Write) -> anyhow::Result<()> { anyhow::bail!("unimplemented") }
