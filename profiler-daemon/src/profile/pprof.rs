//! TODO
use super::Profile;
pub fn write(_p: &Profile, _out: &mut dyn std::io::Write) -> anyhow::Result<()> { anyhow::bail!("unimplemented") }
