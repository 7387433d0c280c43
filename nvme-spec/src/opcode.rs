//! Command opcodes (Base 2.0 "Admin Command Set", NVM Command Set 1.0 "I/O
//! commands", Base 2.0 "Fabrics Command Set").
//!
//! Opcodes are plain `u8` constants rather than an enum: a target must be able
//! to carry any byte it receives to the "Invalid Command Opcode" status, and a
//! closed enum would force a fallible conversion on the hot path.

/// Admin command set opcodes.
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Namespace Management.
    pub const NS_MANAGEMENT: u8 = 0x0D;
    /// Firmware Commit.
    pub const FIRMWARE_COMMIT: u8 = 0x10;
    /// Firmware Image Download.
    pub const FIRMWARE_IMAGE_DOWNLOAD: u8 = 0x11;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x14;
    /// Namespace Attachment.
    pub const NS_ATTACHMENT: u8 = 0x15;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Directive Send.
    pub const DIRECTIVE_SEND: u8 = 0x19;
    /// Directive Receive.
    pub const DIRECTIVE_RECEIVE: u8 = 0x1A;
    /// Virtualization Management.
    pub const VIRTUALIZATION_MANAGEMENT: u8 = 0x1C;
    /// NVMe-MI Send.
    pub const NVME_MI_SEND: u8 = 0x1D;
    /// NVMe-MI Receive.
    pub const NVME_MI_RECEIVE: u8 = 0x1E;
    /// Capacity Management.
    pub const CAPACITY_MANAGEMENT: u8 = 0x20;
    /// Lockdown.
    pub const LOCKDOWN: u8 = 0x24;
    /// Doorbell Buffer Config (PCIe only).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7C;
    /// Fabrics commands share this opcode; see [`super::fctype`].
    pub const FABRICS: u8 = 0x7F;
    /// Format NVM.
    pub const FORMAT_NVM: u8 = 0x80;
    /// Security Send.
    pub const SECURITY_SEND: u8 = 0x81;
    /// Security Receive.
    pub const SECURITY_RECEIVE: u8 = 0x82;
    /// Sanitize.
    pub const SANITIZE: u8 = 0x84;
    /// Get LBA Status.
    pub const GET_LBA_STATUS: u8 = 0x86;

    /// Human name for logs; `None` for opcodes this crate does not know.
    pub const fn name(op: u8) -> Option<&'static str> {
        Some(match op {
            DELETE_IO_SQ => "Delete I/O SQ",
            CREATE_IO_SQ => "Create I/O SQ",
            GET_LOG_PAGE => "Get Log Page",
            DELETE_IO_CQ => "Delete I/O CQ",
            CREATE_IO_CQ => "Create I/O CQ",
            IDENTIFY => "Identify",
            ABORT => "Abort",
            SET_FEATURES => "Set Features",
            GET_FEATURES => "Get Features",
            ASYNC_EVENT_REQUEST => "Asynchronous Event Request",
            NS_MANAGEMENT => "Namespace Management",
            FIRMWARE_COMMIT => "Firmware Commit",
            FIRMWARE_IMAGE_DOWNLOAD => "Firmware Image Download",
            DEVICE_SELF_TEST => "Device Self-test",
            NS_ATTACHMENT => "Namespace Attachment",
            KEEP_ALIVE => "Keep Alive",
            DIRECTIVE_SEND => "Directive Send",
            DIRECTIVE_RECEIVE => "Directive Receive",
            VIRTUALIZATION_MANAGEMENT => "Virtualization Management",
            NVME_MI_SEND => "NVMe-MI Send",
            NVME_MI_RECEIVE => "NVMe-MI Receive",
            CAPACITY_MANAGEMENT => "Capacity Management",
            LOCKDOWN => "Lockdown",
            DOORBELL_BUFFER_CONFIG => "Doorbell Buffer Config",
            FABRICS => "Fabrics",
            FORMAT_NVM => "Format NVM",
            SECURITY_SEND => "Security Send",
            SECURITY_RECEIVE => "Security Receive",
            SANITIZE => "Sanitize",
            GET_LBA_STATUS => "Get LBA Status",
            _ => return None,
        })
    }
}

/// NVM command set I/O opcodes.
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management (deallocate / "unmap" / TRIM).
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    /// Verify.
    pub const VERIFY: u8 = 0x0C;
    /// Reservation Register.
    pub const RESERVATION_REGISTER: u8 = 0x0D;
    /// Reservation Report.
    pub const RESERVATION_REPORT: u8 = 0x0E;
    /// Reservation Acquire.
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    /// Reservation Release.
    pub const RESERVATION_RELEASE: u8 = 0x15;
    /// Copy.
    pub const COPY: u8 = 0x19;
    /// Zone Management Send (Zoned Namespace command set).
    pub const ZONE_MGMT_SEND: u8 = 0x79;
    /// Zone Management Receive (Zoned Namespace command set).
    pub const ZONE_MGMT_RECV: u8 = 0x7A;
    /// Zone Append (Zoned Namespace command set).
    pub const ZONE_APPEND: u8 = 0x7D;

    /// Human name for logs; `None` for opcodes this crate does not know.
    pub const fn name(op: u8) -> Option<&'static str> {
        Some(match op {
            FLUSH => "Flush",
            WRITE => "Write",
            READ => "Read",
            WRITE_UNCORRECTABLE => "Write Uncorrectable",
            COMPARE => "Compare",
            WRITE_ZEROES => "Write Zeroes",
            DATASET_MANAGEMENT => "Dataset Management",
            VERIFY => "Verify",
            RESERVATION_REGISTER => "Reservation Register",
            RESERVATION_REPORT => "Reservation Report",
            RESERVATION_ACQUIRE => "Reservation Acquire",
            RESERVATION_RELEASE => "Reservation Release",
            COPY => "Copy",
            ZONE_MGMT_SEND => "Zone Management Send",
            ZONE_MGMT_RECV => "Zone Management Receive",
            ZONE_APPEND => "Zone Append",
            _ => return None,
        })
    }
}

/// Fabrics command types (FCTYPE, byte 4 of a Fabrics command, opcode 7Fh).
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Authentication Send.
    pub const AUTHENTICATION_SEND: u8 = 0x05;
    /// Authentication Receive.
    pub const AUTHENTICATION_RECEIVE: u8 = 0x06;
    /// Disconnect (I/O queues only).
    pub const DISCONNECT: u8 = 0x08;

    /// Human name for logs; `None` for types this crate does not know.
    pub const fn name(fctype: u8) -> Option<&'static str> {
        Some(match fctype {
            PROPERTY_SET => "Property Set",
            CONNECT => "Connect",
            PROPERTY_GET => "Property Get",
            AUTHENTICATION_SEND => "Authentication Send",
            AUTHENTICATION_RECEIVE => "Authentication Receive",
            DISCONNECT => "Disconnect",
            _ => return None,
        })
    }
}

/// Data transfer direction encoded in the two low bits of every opcode (and of
/// every Fabrics FCTYPE): Base 2.0 "Opcodes for Admin Commands", column "Data
/// Transfer". A transport uses it to decide between R2T and C2HData.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataDirection {
    /// No data transfer.
    None,
    /// Host to controller (writes).
    HostToController,
    /// Controller to host (reads).
    ControllerToHost,
    /// Both directions.
    Bidirectional,
}

impl DataDirection {
    /// Direction from an opcode (or FCTYPE) byte.
    pub const fn from_opcode(op: u8) -> Self {
        match op & 0x3 {
            0 => Self::None,
            1 => Self::HostToController,
            2 => Self::ControllerToHost,
            _ => Self::Bidirectional,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_follow_low_bits() {
        assert_eq!(
            DataDirection::from_opcode(io::WRITE),
            DataDirection::HostToController
        );
        assert_eq!(
            DataDirection::from_opcode(io::READ),
            DataDirection::ControllerToHost
        );
        assert_eq!(DataDirection::from_opcode(io::FLUSH), DataDirection::None);
        assert_eq!(
            DataDirection::from_opcode(io::DATASET_MANAGEMENT),
            DataDirection::HostToController
        );
        assert_eq!(
            DataDirection::from_opcode(admin::IDENTIFY),
            DataDirection::ControllerToHost
        );
        assert_eq!(
            DataDirection::from_opcode(admin::GET_LOG_PAGE),
            DataDirection::ControllerToHost
        );
        assert_eq!(
            DataDirection::from_opcode(fctype::CONNECT),
            DataDirection::HostToController
        );
        assert_eq!(
            DataDirection::from_opcode(fctype::PROPERTY_GET),
            DataDirection::None
        );
        assert_eq!(
            DataDirection::from_opcode(admin::FABRICS),
            DataDirection::Bidirectional
        );
    }

    #[test]
    fn names() {
        assert_eq!(admin::name(0x06), Some("Identify"));
        assert_eq!(io::name(0x09), Some("Dataset Management"));
        assert_eq!(fctype::name(0x01), Some("Connect"));
        assert_eq!(admin::name(0x03), None);
    }
}
