//go:build bench

package p2p_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
)

// TestBenchP2P is `make bench-p2p`, not a test: it runs only with
// STARLING_BENCH=1 and asserts nothing about time. On a cluster of a
// registry, a scheduler, a seed and N+1 peers, every host behind a link of
// STARLING_BENCH_RATE both ways:
//
//   - T1: one peer alone fetches blob A (nobody holds it: no P2P help);
//   - TN: N other peers fetch blob B, of the same size, at once; TN is the
//     time of the last one;
//
// and it prints origin_ratio (bytes of B the registry sent / size of B) and
// last_peer_ratio (TN / T1) with their targets.
func TestBenchP2P(t *testing.T) {
	if os.Getenv("STARLING_BENCH") != "1" {
		t.Skip("benchmark; run with make bench-p2p")
	}
	peersN := envInt(t, "STARLING_BENCH_PEERS", 8)
	rate := os.Getenv("STARLING_BENCH_RATE")
	if rate == "" {
		// The hosts share this machine's cores: at 100mbit the links, not
		// the CPU, are what the benchmark measures (hack/bench-p2p.sh).
		rate = "100mbit"
	}
	sizeMiB := envSizeMiB(t, "STARLING_BENCH_SIZE", 128)
	size := sizeMiB << 20
	bps, err := testenv.ParseRate(rate)
	if err != nil {
		t.Fatal(err)
	}

	c := newCluster(t, "stpb", rate)
	c.addNode("seed", "seed")
	alone := c.addNode("alone", "peer")
	var peers []*node
	for i := 1; i <= peersN; i++ {
		peers = append(peers, c.addNode(fmt.Sprintf("peer%d", i), "peer"))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// For reference: the link itself, a plain download from the registry
	// with no starling in the way.
	ref := c.pushBlob("bench/ref", size, 100)
	tLink := plainDownload(ctx, t, alone, c.upstream, ref)

	a := c.pushBlob("bench/a", size, 101)
	r1 := alone.fetch(ctx, a, nil)
	checkAll(t, a, []fetchResult{r1})
	t1 := r1.elapsed

	b := c.pushBlob("bench/b", size, 102)
	res := fetchAll(ctx, peers, b, nil)
	checkAll(t, b, res)
	tn := slowest(res)
	if t.Failed() {
		return
	}
	originRatio := c.ratio(b)
	lastRatio := tn.Seconds() / t1.Seconds()

	fmt.Printf("\nbench-p2p: %d peers + a seed, %d MiB blob, links %s both ways, %d cores\n", peersN, sizeMiB, rate, runtime.NumCPU())
	fmt.Printf("  link alone (plain GET from the registry):  %6.2f s  (%.0f%% of %s)\n",
		tLink.Seconds(), 100*float64(size)/tLink.Seconds()/float64(bps), rate)
	fmt.Printf("  T1 one peer alone through starling:       %6.2f s\n", t1.Seconds())
	fmt.Printf("  TN last of %d peers at once:               %6.2f s\n", peersN, tn.Seconds())
	fmt.Printf("  origin bytes for B: %d (%.1f MiB)\n", c.origin.BlobBytes(b.digest), float64(c.origin.BlobBytes(b.digest))/(1<<20))
	fmt.Printf("origin_ratio=%.3f last_peer_ratio=%.2f\n", originRatio, lastRatio)
	fmt.Printf("targets: origin_ratio <= 1.05, last_peer_ratio <= 1.5\n")
	verdict := "PASS"
	if originRatio > 1.05 || lastRatio > 1.5 {
		verdict = "MISS"
	}
	fmt.Printf("%s origin_ratio=%.3f (<= 1.05) last_peer_ratio=%.2f (<= 1.5)\n", verdict, originRatio, lastRatio)
}

// plainDownload GETs b straight from the registry host, from n's host.
func plainDownload(ctx context.Context, t *testing.T, n *node, upstream string, b blob) time.Duration {
	t.Helper()
	start := time.Now()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, upstream+"/v2/"+b.repo+"/blobs/"+b.digest, nil)
	resp, err := n.client.Do(req)
	if err != nil {
		t.Fatalf("plain download: %v", err)
	}
	defer resp.Body.Close()
	h := sha256.New()
	if _, err := io.Copy(h, resp.Body); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("plain download: %s, %v", resp.Status, err)
	}
	if got := "sha256:" + hex.EncodeToString(h.Sum(nil)); got != b.digest {
		t.Fatalf("plain download: digest %s, want %s", got, b.digest)
	}
	return time.Since(start)
}

// envSizeMiB reads a size in MiB: "128", "128M", "128MiB", "1G", "1GiB".
func envSizeMiB(t *testing.T, name string, def int) int {
	t.Helper()
	s := strings.TrimSpace(os.Getenv(name))
	if s == "" {
		return def
	}
	mult := 1
	for _, u := range []struct {
		suffix string
		mult   int
	}{{"GiB", 1024}, {"G", 1024}, {"MiB", 1}, {"M", 1}} {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = num, u.mult
			break
		}
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		t.Fatalf("%s=%q: want a size in MiB such as 128 or 1GiB", name, os.Getenv(name))
	}
	return v * mult
}

func envInt(t *testing.T, name string, def int) int {
	t.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	v, err := strconv.Atoi(s)
	if err != nil || v <= 0 {
		t.Fatalf("%s=%q: want a positive integer", name, s)
	}
	return v
}
