//! pilotlight receiver: applies committed generations into sparse raw images.
//!
//! Work in progress (issue 3). The protocol it consumes is in `pilotlight-protocol`.
