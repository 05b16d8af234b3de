//! The generated `ringmoe.v1` protocol (see `proto/ringmoe/v1/ringmoe.proto`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

tonic::include_proto!("ringmoe.v1");

/// The encoded descriptor set server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ringmoe_v1_descriptor");
