//! qcow2-async: a Tokio-native engine for QEMU's qcow2 image format.

pub mod io;
