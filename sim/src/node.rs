//! What the simulator runs: the traits a node implementation provides.
//!
//! The simulator is generic over its nodes. A node is one host — the hub or one device — and it
//! is driven exactly like a sans-IO protocol core (quinn-proto style):
//!
//! 1. input: [`SimNode::handle_connected`], [`SimNode::handle_disconnected`],
//!    [`SimNode::handle_message`], [`SimNode::handle_timeout`], [`FieldNode::local_edit`],
//!    [`FieldNode::handle_admin`];
//! 2. then, after every input, the simulator drains [`SimNode::poll_transmit`] until `None`,
//!    drains [`SimNode::poll_event`] until `None`, and reads [`SimNode::poll_timeout`].
//!
//! Time is the node's *local* clock in milliseconds since the Unix epoch (virtual time plus
//! [`SIM_EPOCH_MS`] plus the device's clock skew); nodes never read a clock or draw randomness of
//! their own. The invariant checker sees a node's state only through [`Observe`].

use crate::digest::Fnv64;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Virtual time 0 of every run, as a node sees it: 2026-01-05T06:00:00Z in ms since the epoch.
pub const SIM_EPOCH_MS: u64 = 1_767_592_800_000;

/// The hub is always node 0; devices are 1..=N in the order of the scenario's groups.
pub const HUB: NodeId = NodeId(0);

/// A host in the simulation: 0 is the hub, devices are numbered from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub u32);

impl NodeId {
    /// Whether this is the hub.
    pub fn is_hub(self) -> bool {
        self == HUB
    }
    /// Index into per-node vectors.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_hub() {
            write!(f, "hub")
        } else {
            write!(f, "d{}", self.0)
        }
    }
}

/// A row the workload knows: the table's index in the scenario and a run-unique number.
///
/// A real-store adapter maps it to a `(table name, uuid)` deterministically.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RowKey {
    /// Index of the table in the scenario's `[[workload.tables]]`.
    pub table: u32,
    /// Row number, unique within the run.
    pub id: u64,
}

impl fmt::Display for RowKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}/r{}", self.table, self.id)
    }
}

/// One edit the workload issued, unique within the run (numbered in issue order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OpId(pub u64);

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op{}", self.0)
    }
}

/// What an edit does to its row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EditKind {
    /// Create the row (owned by the editing device).
    Create,
    /// Set one column to a value.
    Update {
        /// Column index within the table.
        column: u32,
        /// The new value (the workload draws it).
        value: u64,
    },
    /// Delete the row.
    Delete,
}

/// An edit the workload asks a node to commit locally (a device user, or an office user at
/// the hub).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edit {
    /// The op's run-unique id; the node must keep it with the op so that [`Observe::has_op`] and
    /// [`NodeEvent::Applied`] can name it on every replica.
    pub op: OpId,
    /// The row edited.
    pub row: RowKey,
    /// What the edit does.
    pub kind: EditKind,
}

/// Whether a node committed an edit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditResult {
    /// Committed durably: from now on the op must not be lost.
    Committed,
    /// Committed but not yet durable: a crash may lose it.
    Volatile,
    /// Refused locally (for example the row is unknown or deleted); nothing changed.
    Refused,
}

/// An administrative change applied at the hub (the environment changes under the devices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AdminEvent {
    /// The row's owner changes to another device: it leaves one row set and enters another.
    Reassign {
        /// The row.
        row: RowKey,
        /// The new owner.
        to: NodeId,
    },
    /// The device's offline profile now selects exactly these tables (bit i = table i).
    SetProfile {
        /// The device.
        device: NodeId,
        /// Bit mask of selected tables.
        tables: u64,
    },
    /// The device's user's roles now deny reading these tables (bit i = table i).
    SetRole {
        /// The device.
        device: NodeId,
        /// Bit mask of denied tables.
        denied: u64,
    },
}

/// Something a node reports to the simulator (metrics and invariant hooks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeEvent {
    /// An op from another node took effect here (first time; a duplicate must not be reported).
    Applied {
        /// The op.
        op: OpId,
        /// Its row.
        row: RowKey,
    },
    /// Device: the hub acknowledged (durably accepted) one of this device's ops.
    Acked {
        /// The op.
        op: OpId,
    },
    /// Device: the hub rejected one of this device's ops (it was rolled back here).
    Rejected {
        /// The op.
        op: OpId,
        /// Its row.
        row: RowKey,
    },
    /// A concurrent edit lost to another on this row (counted where it is detected).
    Conflict {
        /// The row.
        row: RowKey,
    },
    /// Device: the row left this device's set and was removed.
    Evicted {
        /// The row.
        row: RowKey,
    },
    /// Device: a sync completed: the device pulled to the end of one table's feed (`table`), or
    /// of every table's (`None`).
    SyncCompleted {
        /// The table's index, or `None` for all of them.
        table: Option<u32>,
        /// Local time at which that sync started (the pull was sent); `None` when the hub sent
        /// the batch on its own (live mode): the simulator then takes the time the message
        /// that completed the sync was sent.
        started_local_ms: Option<u64>,
    },
}

impl fmt::Display for NodeEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeEvent::Applied { op, row } => write!(f, "applied {op} on {row}"),
            NodeEvent::Acked { op } => write!(f, "got the hub's ack of {op}"),
            NodeEvent::Rejected { op, row } => write!(f, "got {op} on {row} rejected"),
            NodeEvent::Conflict { row } => write!(f, "saw a conflict on {row}"),
            NodeEvent::Evicted { row } => write!(f, "evicted {row}"),
            NodeEvent::SyncCompleted {
                table,
                started_local_ms,
            } => {
                match table {
                    Some(t) => write!(f, "completed a sync of t{t}")?,
                    None => write!(f, "completed a sync")?,
                }
                match started_local_ms {
                    Some(s) => write!(f, " started at local {s}"),
                    None => write!(f, " the hub started"),
                }
            }
        }
    }
}

/// A message a node wants sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit<M> {
    /// Destination: devices talk to the hub, the hub to devices.
    pub to: NodeId,
    /// The message.
    pub msg: M,
}

/// What the simulator needs from a message type.
pub trait SimMessage: Clone + fmt::Debug {
    /// Encoded size in bytes (drives bandwidth delay and the byte counters).
    fn wire_len(&self) -> usize;
    /// A short name of the message kind, for the steps shown with a violation.
    fn kind(&self) -> &'static str;
    /// Feed a canonical, machine-independent encoding of the message into the trace digest.
    fn digest(&self, hasher: &mut Fnv64);
}

impl SimMessage for Vec<u8> {
    fn wire_len(&self) -> usize {
        self.len()
    }
    fn kind(&self) -> &'static str {
        "bytes"
    }
    fn digest(&self, hasher: &mut Fnv64) {
        hasher.write_bytes(self);
    }
}

/// A host driven by the simulator, sans-IO: no sockets, no clock, no randomness of its own.
///
/// `now` is the node's local time (see the module docs). Poll order after each input:
/// `poll_transmit` until `None`, `poll_event` until `None`, then `poll_timeout`.
pub trait SimNode {
    /// The protocol's message type.
    type Msg: SimMessage;

    /// A connection to `peer` opened (a device's link came up and it wanted to connect).
    fn handle_connected(&mut self, now: u64, peer: NodeId);
    /// The connection to `peer` closed; messages in flight on it are lost.
    fn handle_disconnected(&mut self, now: u64, peer: NodeId);
    /// A message from `from` arrived.
    fn handle_message(&mut self, now: u64, from: NodeId, msg: Self::Msg);
    /// The deadline last returned by `poll_timeout` passed.
    fn handle_timeout(&mut self, now: u64);
    /// The next message to send, if any. Sending on a closed connection loses the message.
    fn poll_transmit(&mut self) -> Option<Transmit<Self::Msg>>;
    /// The next event to report, if any.
    fn poll_event(&mut self) -> Option<NodeEvent>;
    /// The local time at which `handle_timeout` should be called, if any.
    fn poll_timeout(&self) -> Option<u64>;
    /// Device only: whether it wants a connection to the hub now. A device that returns `false`
    /// while connected is disconnected (saving battery); default: always.
    fn wants_connection(&self) -> bool {
        true
    }
    /// The process dies: everything that was not durable is lost, the outbox and all
    /// connections with it. No other call comes until `restart`.
    fn crash(&mut self);
    /// The process starts again from its durable state.
    fn restart(&mut self, now: u64);
}

/// Read-only hooks the invariant checker and the metrics use.
pub trait Observe {
    /// Visit every row this node holds, with a digest of its visible content (equal content
    /// must give equal digests on every node).
    fn for_each_row(&self, f: &mut dyn FnMut(RowKey, u64));
    /// Visit every row this node holds, without computing digests (default: via
    /// `for_each_row`; override when digests are costly).
    fn for_each_row_key(&self, f: &mut dyn FnMut(RowKey)) {
        self.for_each_row(&mut |r, _| f(r));
    }
    /// Visit every row of table `table` this node holds (default: `for_each_row_key`,
    /// filtered; override when a table can be walked alone).
    fn for_each_row_key_of(&self, table: u32, f: &mut dyn FnMut(RowKey)) {
        self.for_each_row_key(&mut |r| {
            if r.table == table {
                f(r);
            }
        });
    }
    /// The digest of one row's content, if the node holds it.
    fn row_digest(&self, row: RowKey) -> Option<u64>;
    /// Whether this node's state includes the op (applied, or its own).
    fn has_op(&self, op: OpId) -> bool;
    /// Device: ops committed here and not yet acknowledged by the hub.
    fn pending_ops(&self) -> usize;
    /// Device: whether some pending op touches the row (such a row is not evicted yet).
    fn has_pending_on(&self, row: RowKey) -> bool;
    /// Device: visit its pull cursors as (key, position) — one per table (the key is the
    /// table's index) or a single one (key 0). A cursor must never move backwards, except to
    /// its durable value on a crash.
    fn for_each_cursor(&self, f: &mut dyn FnMut(u32, u64));
}

/// A node of the fieldsync kind: a [`SimNode`] that also takes edits and admin changes.
pub trait FieldNode: SimNode + Observe {
    /// Commit an edit locally (device user, or an office user editing upstream at the hub).
    fn local_edit(&mut self, now: u64, edit: &Edit) -> EditResult;
    /// Hub only: apply an administrative change (ownership, profile, role).
    fn handle_admin(&mut self, now: u64, event: &AdminEvent);
}

/// What a factory gets to build a node: the initial world and the sync settings.
#[derive(Debug)]
pub struct NodeContext<'a> {
    /// Initial owners, hot rows, profiles and roles.
    pub world: &'a crate::world::World,
    /// The scenario's sync settings.
    pub sync: &'a crate::scenario::SyncConfig,
    /// Table names, by index.
    pub tables: &'a [String],
    /// Each table's column count (`c0..cN`), by index.
    pub columns: &'a [u32],
    /// Group names, by index.
    pub groups: &'a [String],
    /// Each device's group index: `device_groups[d - 1]` for device `d`.
    pub device_groups: &'a [usize],
}

/// Builds the hub and the devices of a run (so that the run can be repeated bit for bit).
pub trait NodeFactory {
    /// The node type (typically an enum of hub and device).
    type Node: FieldNode;
    /// Build the hub.
    fn hub(&mut self, ctx: &NodeContext<'_>) -> Result<Self::Node, crate::ScenarioError>;
    /// Build one device, already holding its initial row set.
    fn device(
        &mut self,
        id: NodeId,
        ctx: &NodeContext<'_>,
    ) -> Result<Self::Node, crate::ScenarioError>;
}
