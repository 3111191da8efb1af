//! User stacks without frame pointers: the unwind tables the kernel
//! programs walk. [`table`] builds an object's rows from its bytes (pure);
//! [`publish`] loads them into the kernel's maps and keeps the target's
//! executable mappings there current.

pub mod publish;
pub mod table;

pub use publish::Unwinder;
