//! The mirror bdev.

pub mod superblock;
