//! Compiles `switchboard/v1/*.proto` with protox (pure Rust, so no `protoc` is needed) and generates the
//! tonic clients and servers, plus the encoded descriptor set that server reflection serves.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "switchboard/v1/types.proto",
        "switchboard/v1/registry.proto",
        "switchboard/v1/dataplane.proto",
        "switchboard/v1/admin.proto",
    ];
    println!("cargo:rerun-if-changed=switchboard");

    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("switchboard_descriptor.bin"), prost::Message::encode_to_vec(&fds))?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
