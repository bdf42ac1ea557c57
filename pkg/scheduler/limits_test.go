package scheduler

import "github.com/starling-dev/starling/pkg/piece"

// psz is the piece size of the tests that go through the server, which
// refuses anything smaller than piece.MinSize.
const psz = piece.MinSize
