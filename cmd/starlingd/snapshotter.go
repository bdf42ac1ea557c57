package main

// The snapshotter component registers itself here (issue 3).
