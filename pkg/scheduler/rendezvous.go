package scheduler

import (
	"crypto/sha256"
	"encoding/binary"
)

// score is the rendezvous (highest random weight) hash of a key on a node:
// every party that knows the same nodes picks the same one for a key, and
// removing a node moves only the keys it had.
func score(key, node string) uint64 {
	h := sha256.Sum256([]byte(key + "\x00" + node))
	return binary.BigEndian.Uint64(h[:8])
}

// Pick returns the node of nodes that key belongs to ("" for none).
func Pick(key string, nodes []string) string {
	best, bestScore := "", uint64(0)
	for _, n := range nodes {
		if s := score(key, n); best == "" || s > bestScore {
			best, bestScore = n, s
		}
	}
	return best
}
