//! The command-line binary's integration tests, built as one test program: each module
//! would otherwise link the whole service stack into a binary of its own.

mod cluster;
mod decompress;
mod faults;
mod hostile_service;
mod interrupt;
mod malformed;
mod memory;
mod real_model;
mod report;
mod service;
mod structured;
