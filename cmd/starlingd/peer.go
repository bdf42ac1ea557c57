package main

// The peer component (upload server, proxy) registers itself here (issue 4).
