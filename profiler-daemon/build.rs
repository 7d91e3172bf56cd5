//! Builds the BPF programs with the pinned nightly and embeds them.
use std::{env, fs, path::PathBuf};

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow::anyhow!("OUT_DIR"))?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Placeholder so the crate compiles; loading reports that BPF was not built.
        let obj = out_dir.join("profiler");
        if !obj.exists() {
            fs::write(obj, b"")?;
        }
        return Ok(());
    }
    let ebpf = aya_build::Package {
        name: "profiler-ebpf",
        root_dir: "../profiler-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom("nightly-2026-05-20"))
}
