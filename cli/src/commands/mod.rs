//! One module per subcommand.

pub mod bench;
pub mod cancel;
pub mod compress;
pub mod coordinator;
pub mod decompress;
pub mod estimate;
pub mod inspect;
pub mod list;
pub mod recipes;
pub mod report;
pub mod status;
pub mod submit;
pub mod watch;
pub mod worker;
