//! plexd
