//! Deterministic simulation of spotty connectivity over fieldsync's real store and protocol.
//!
//! Not built yet: see the simulator issue.
#![warn(missing_docs)]
