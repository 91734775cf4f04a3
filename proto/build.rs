//! Generates Rust for every `.proto` with tonic/prost. protoc comes from a vendored crate
//! unless `PROTOC` is set, so a fresh machine needs only cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/metapb.proto",
        "proto/errorpb.proto",
        "proto/raft_serverpb.proto",
        "proto/raft_cmdpb.proto",
        "proto/kvrpcpb.proto",
        "proto/pdpb.proto",
        // etcd's v3 API (vendored; see the header of each file).
        "proto/etcd/mvccpb/kv.proto",
        "proto/etcd/authpb/auth.proto",
        "proto/etcd/etcdserverpb/rpc.proto",
        "proto/etcd/v3electionpb/v3election.proto",
        "proto/etcd/v3lockpb/v3lock.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let mut config = tonic_prost_build::Config::new();
    if std::env::var_os("PROTOC").is_none() {
        config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    }
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
