//! TCP sockets set up with socket2.
