//! One module per subcommand.

pub mod compress;
pub mod inspect;
pub mod recipes;
