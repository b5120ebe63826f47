//! Running a plan: wave by wave.
