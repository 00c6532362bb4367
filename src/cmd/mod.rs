//! The subcommands of the binary. Only the binary declares this module: the library never
//! sees clap.

pub mod args;
pub mod dev;
pub mod emulator;
pub mod serve;
pub mod token;
pub mod walkthrough;

/// EX_USAGE: a configuration error.
pub const EXIT_CONFIG: u8 = 64;
