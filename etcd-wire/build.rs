//! Compiles `proto/` (Switchboard's own subset of the etcd v3 API) with protox, pure Rust, so no `protoc`
//! is needed, and generates the tonic clients: Switchboard only ever calls etcd, it serves none of it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["mvccpb/kv.proto", "etcdserverpb/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure().build_server(false).compile_fds(fds)?;
    Ok(())
}
