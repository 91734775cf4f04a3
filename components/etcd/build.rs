//! Compiles etcd's vendored protos (`proto/proto/etcd/`) into a descriptor set for the JSON
//! gateway's reflection (`src/json.rs`). protoc is the vendored one unless `PROTOC` is set, as in
//! `proto/build.rs`.

use std::path::PathBuf;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto/proto");
    let protos = [
        "etcd/mvccpb/kv.proto",
        "etcd/authpb/auth.proto",
        "etcd/etcdserverpb/rpc.proto",
        "etcd/v3electionpb/v3election.proto",
        "etcd/v3lockpb/v3lock.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    let protoc = match std::env::var_os("PROTOC") {
        Some(p) => PathBuf::from(p),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("etcd_descriptor.bin");
    let status = Command::new(&protoc)
        .arg("--include_imports")
        .arg(format!("--descriptor_set_out={}", out.display()))
        .arg(format!("-I{}", root.display()))
        .args(protos)
        .status()
        .map_err(|e| format!("run {}: {e}", protoc.display()))?;
    if !status.success() {
        return Err(format!("{} failed: {status}", protoc.display()).into());
    }
    Ok(())
}
