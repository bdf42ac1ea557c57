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
// registry behind a link of STARLING_BENCH_RATE (the origin link), a
// scheduler, a seed and N peers, each behind a link of
// STARLING_BENCH_PEER_RATE, all both ways:
//
//   - baseline: one plain GET of a blob from the registry, the time one
//     transfer over the origin link takes (size/origin-rate as measured);
//   - run: the N peers fetch blob B at once; last_peer_ratio is the time of
//     the last one over the baseline, origin_ratio the bytes of B the
//     registry sent over B's size;
//   - fault run: the N peers fetch blob C at once; a quarter in, one of
//     them is SIGKILLed, and a little later the scheduler is SIGKILLed and
//     started again; fault_origin_ratio is the bytes of C the registry sent
//     over C's size (the other peers must finish with the right digest);
//
// and the CPU seconds (user+system) every starlingd and the scheduler
// used during each run.
func TestBenchP2P(t *testing.T) {
	if os.Getenv("STARLING_BENCH") != "1" {
		t.Skip("benchmark; run with make bench-p2p")
	}
	peersN := envInt(t, "STARLING_BENCH_PEERS", 8)
	rate := os.Getenv("STARLING_BENCH_RATE")
	if rate == "" {
		rate = "100mbit"
	}
	peerRate := os.Getenv("STARLING_BENCH_PEER_RATE")
	if peerRate == "" {
		peerRate = "1gbit"
	}
	sizeMiB := envSizeMiB(t, "STARLING_BENCH_SIZE", 256)
	size := sizeMiB << 20
	bps, err := testenv.ParseRate(rate)
	if err != nil {
		t.Fatal(err)
	}

	c := newCluster(t, "stpb", peerRate)
	// The registry's host alone sits behind the slow origin link.
	shapeHost(t, c.net, c.regHost, rate)
	seed := c.addNode("seed", "seed")
	var peers []*node
	for i := 1; i <= peersN; i++ {
		peers = append(peers, c.addNode(fmt.Sprintf("peer%d", i), "peer"))
	}
	daemons := append([]*node{seed}, peers...)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()

	// The link itself: a plain download from the registry, no starling.
	ref := c.pushBlob("bench/ref", size, 100)
	tLink := plainDownload(ctx, t, peers[0], c.upstream, ref)

	b := c.pushBlob("bench/b", size, 102)
	cpu0 := c.cpuTimes(daemons)
	res := fetchAll(ctx, peers, b, nil)
	cpuRun := c.cpuTimes(daemons).minus(cpu0)
	checkAll(t, b, res)
	tn := slowest(res)
	if t.Failed() {
		return
	}
	originRatio := c.ratio(b)
	lastRatio := tn.Seconds() / tLink.Seconds()

	// The fault run: a peer killed mid-transfer, the scheduler killed and
	// restarted.
	f := c.pushBlob("bench/fault", size, 103)
	victim := peers[len(peers)-1]
	progs := make([]*progress, len(peers))
	for i := range progs {
		progs[i] = new(progress)
	}
	cpu0 = c.cpuTimes(daemons)
	done := make(chan []fetchResult, 1)
	go func() { done <- fetchAll(ctx, peers, f, progs) }()
	waitBytes := func(p *progress, n int64) {
		for p.bytes.Load() < n && !p.done.Load() && ctx.Err() == nil {
			time.Sleep(5 * time.Millisecond)
		}
	}
	waitBytes(progs[len(progs)-1], f.size()/4)
	victimGot := progs[len(progs)-1].bytes.Load()
	victim.proc.Kill()
	waitBytes(progs[0], f.size()*2/5)
	firstGot := progs[0].bytes.Load()
	c.sched.Kill()
	restartAt := time.Now()
	c.startScheduler()
	schedDown := time.Since(restartAt)
	fres := <-done
	cpuFault := c.cpuTimes(daemons).minus(cpu0)
	checkAll(t, f, fres[:len(fres)-1])
	faultRatio := c.ratio(f)
	tf := slowest(fres[:len(fres)-1])

	linkSecs := float64(size) / float64(bps)
	fmt.Printf("\nbench-p2p: %d peers + a seed, %d MiB blob, origin link %s, peer links %s, %d cores\n",
		peersN, sizeMiB, rate, peerRate, runtime.NumCPU())
	fmt.Printf("  baseline: plain GET from the registry    %6.2f s  (size/rate %.2f s; %.0f%% of %s)\n",
		tLink.Seconds(), linkSecs, 100*linkSecs/tLink.Seconds(), rate)
	fmt.Printf("  run: last of %d peers at once             %6.2f s  (%.2f x size/rate)\n", peersN, tn.Seconds(), tn.Seconds()/linkSecs)
	for _, r := range res {
		fmt.Printf("    %-8s %6.2f s\n", r.node.name, r.elapsed.Seconds())
	}
	fmt.Printf("  run: origin bytes for B %d (%.1f MiB)\n", c.origin.BlobBytes(b.digest), float64(c.origin.BlobBytes(b.digest))/(1<<20))
	fmt.Printf("  fault run: %s killed at %d MiB, scheduler killed at %d MiB of %s and back in %.2f s; last survivor %6.2f s\n",
		victim.name, victimGot>>20, firstGot>>20, peers[0].name, schedDown.Seconds(), tf.Seconds())
	fmt.Printf("  fault run: origin bytes for C %d (%.1f MiB)\n", c.origin.BlobBytes(f.digest), float64(c.origin.BlobBytes(f.digest))/(1<<20))
	fmt.Printf("  CPU seconds (user+system)      run   fault\n")
	var sumRun, sumFault float64
	for _, name := range cpuRun.names {
		fmt.Printf("    %-24s %6.2f  %6.2f\n", name, cpuRun.secs[name], cpuFault.secs[name])
		sumRun += cpuRun.secs[name]
		sumFault += cpuFault.secs[name]
	}
	fmt.Printf("    %-24s %6.2f  %6.2f  (of %.0f and %.0f available on %d cores)\n", "all daemons", sumRun, sumFault,
		tn.Seconds()*float64(runtime.NumCPU()), tf.Seconds()*float64(runtime.NumCPU()), runtime.NumCPU())
	fmt.Printf("    %-24s %6.2f  %6.2f\n", "per GiB delivered", sumRun/(float64(peersN)*float64(size)/(1<<30)),
		sumFault/(float64(peersN-1)*float64(size)/(1<<30)))
	fmt.Printf("origin_ratio=%.3f last_peer_ratio=%.2f fault_origin_ratio=%.3f cpu_seconds_run=%.1f cpu_seconds_fault=%.1f\n",
		originRatio, lastRatio, faultRatio, sumRun, sumFault)
	fmt.Printf("targets: origin_ratio <= 1.05, last_peer_ratio <= 1.3, fault_origin_ratio <= 1.10\n")
	verdict := "PASS"
	if originRatio > 1.05 || lastRatio > 1.3 || faultRatio > 1.10 {
		verdict = "MISS"
	}
	fmt.Printf("%s origin_ratio=%.3f (<= 1.05) last_peer_ratio=%.2f (<= 1.3) fault_origin_ratio=%.3f (<= 1.10)\n",
		verdict, originRatio, lastRatio, faultRatio)
}

// shapeHost limits h's link (both ways) to rate instead of the network's.
func shapeHost(t *testing.T, n *testenv.Network, h *testenv.Host, rate string) {
	t.Helper()
	bps, err := testenv.ParseRate(rate)
	if err != nil {
		t.Fatal(err)
	}
	// As testenv sizes tbf: a bucket of 10 ms (at least 128 KiB), a queue
	// of 50 ms.
	burst := max(bps/100, 128<<10)
	limit := max(bps/20, 2*burst)
	args := []string{"tbf", "rate", rate, "burst", strconv.FormatInt(burst, 10), "limit", strconv.FormatInt(limit, 10)}
	// The switch's end of the host's veth is v<last octet of its address>.
	swIf := "v" + h.IP[strings.LastIndexByte(h.IP, '.')+1:]
	for _, c := range [][]string{
		append([]string{"ip", "netns", "exec", n.Switch, "tc", "qdisc", "replace", "dev", swIf, "root"}, args...),
		append([]string{"ip", "netns", "exec", h.NS, "tc", "qdisc", "replace", "dev", "eth0", "root"}, args...),
	} {
		testenv.Run(t, c[0], c[1:]...)
	}
}

// cpuTimes are CPU seconds per daemon, in a fixed order.
type cpuTimes struct {
	names []string
	secs  map[string]float64
}

func (a cpuTimes) minus(b cpuTimes) cpuTimes {
	out := cpuTimes{names: a.names, secs: map[string]float64{}}
	for _, n := range a.names {
		out.secs[n] = a.secs[n] - b.secs[n]
	}
	return out
}

// cpuTimes reads the user+system CPU time of every process each daemon
// and the scheduler have had (restarts included).
func (c *cluster) cpuTimes(nodes []*node) cpuTimes {
	out := cpuTimes{secs: map[string]float64{}}
	add := func(name string, runs []*testenv.Proc) {
		out.names = append(out.names, name)
		for _, p := range runs {
			out.secs[name] += procCPU(p)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	add("scheduler", c.schedRuns)
	for _, n := range nodes {
		add(n.name, n.runs)
	}
	return out
}

// procCPU is a process's CPU seconds: from /proc while it runs, from its
// rusage once it exited. The process is the daemon itself: `ip netns
// exec` execs it in place.
func procCPU(p *testenv.Proc) float64 {
	if p.Exited() {
		if ps := p.Cmd.ProcessState; ps != nil {
			return (ps.UserTime() + ps.SystemTime()).Seconds()
		}
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.Cmd.Process.Pid))
	if err != nil {
		return 0
	}
	// Fields after the command name (which may hold spaces) in parentheses:
	// utime and stime are the 12th and 13th, in clock ticks (100 a second).
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (ut + st) / 100
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
