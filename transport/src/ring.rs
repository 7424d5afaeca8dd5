//! io_uring set-up and plumbing.
