//! Helpers shared by the workspace end-to-end tests.
#![warn(missing_docs)]
