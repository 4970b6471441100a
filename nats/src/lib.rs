//! JetStream fan-out for Nura: the topology (stream, subjects, headers), the message encoding,
//! and the relay that copies the Postgres log into JetStream in commit order.
//!
//! JetStream is never the record (DESIGN.md invariant 1): everything published here can be
//! republished from Postgres, and consumers repair holes from Postgres too.

pub mod relay;
mod topology;

pub use topology::{
    Delivered, Topology, decode, encode, encode_raw, header_names, headers, prev_of,
};
