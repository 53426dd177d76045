//! Newtypes that keep guest (virtual disk) offsets and host (file) offsets apart.
//!
//! Mixing the two is the classic qcow2 bug (LUKS IVs use host sectors, legacy AES guest
//! sectors; L2 lookups take guest offsets, refcounts host offsets). The types make the
//! compiler check which is which.

use std::fmt;

/// A byte offset in the virtual disk the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in a host file (the qcow2 file or its external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

macro_rules! offset_impls {
    ($t:ident) => {
        impl $t {
            /// The raw byte offset.
            pub const fn get(self) -> u64 {
                self.0
            }
            /// Adds `n` bytes, `None` on overflow.
            pub fn checked_add(self, n: u64) -> Option<Self> {
                self.0.checked_add(n).map($t)
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}
offset_impls!(GuestOffset);
offset_impls!(HostOffset);
