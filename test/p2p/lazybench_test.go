//go:build bench

package p2p_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/starling-dev/starling/internal/testenv"
)

// TestBenchLazyP2P is `make bench-lazy-p2p`, not a test: it runs only with
// the bench build tag and asserts nothing about time. The python image,
// converted by `starling convert`, is started lazily (pull + python3 -V)
// with the registry behind a shaped link and 10 ms added per request,
// background fetch off, fresh state for every run, in four set-ups:
//
//  1. one node, no scheduler: lazy reads straight from the registry;
//  2. a scheduler, a seed and one node;
//  3. a scheduler, a seed and three nodes starting at once;
//  4. a fourth node, after 3.
//
// It prints the median of STARLING_BENCH_RUNS runs (default 3) of each and
// the ratios issue 10 sets against set-up 1.
func TestBenchLazyP2P(t *testing.T) {
	layout := os.Getenv("STARLING_BENCH_LAYOUT")
	if layout == "" {
		t.Fatal("STARLING_BENCH_LAYOUT names the OCI layout of the python image")
	}
	rate := os.Getenv("STARLING_BENCH_RATE")
	if rate == "" {
		rate = "100mbit"
	}
	runs := 3
	if v := os.Getenv("STARLING_BENCH_RUNS"); v != "" {
		fmt.Sscan(v, &runs)
	}
	testenv.Require(t, "containerd", "ctr", "runc", "skopeo")
	type result struct {
		alone, seedOne, threeSlowest, fourth time.Duration
		aloneB, seedOneB, threeB, fourthB    int64
	}
	var rs []result
	for i := 0; i < runs; i++ {
		var r result
		// 1. One node alone.
		func() {
			c, ref := lazyCluster(t, "lb1", rate, layout)
			n := c.addLazyNode("alone", "peer", false)
			c.origin.Reset()
			r.alone = n.coldStart(t, ref)
			r.aloneB = c.origin.BytesServed()
			c.close()
		}()
		// 2-4. Scheduler, seed and nodes.
		func() {
			c, ref := lazyCluster(t, "lb2", rate, layout)
			c.addLazyNode("seed", "seed", true)
			one := c.addLazyNode("one", "peer", true)
			c.origin.Reset()
			r.seedOne = one.coldStart(t, ref)
			r.seedOneB = c.origin.BytesServed()
			c.close()
		}()
		func() {
			c, ref := lazyCluster(t, "lb3", rate, layout)
			c.addLazyNode("seed", "seed", true)
			nodes := []*lazyNode{c.addLazyNode("n1", "peer", true), c.addLazyNode("n2", "peer", true), c.addLazyNode("n3", "peer", true)}
			c.origin.Reset()
			var mu sync.Mutex
			var wg sync.WaitGroup
			for _, n := range nodes {
				wg.Add(1)
				go func() {
					defer wg.Done()
					d := n.coldStart(t, ref)
					mu.Lock()
					r.threeSlowest = max(r.threeSlowest, d)
					mu.Unlock()
				}()
			}
			wg.Wait()
			r.threeB = c.origin.BytesServed()
			fourth := c.addLazyNode("n4", "peer", true)
			c.origin.Reset()
			r.fourth = fourth.coldStart(t, ref)
			r.fourthB = c.origin.BytesServed()
			c.close()
		}()
		t.Logf("run %d: alone %.2f s (%d B), seed+one %.2f s (%d B), three slowest %.2f s (%d B), fourth %.2f s (%d B)", i+1,
			r.alone.Seconds(), r.aloneB, r.seedOne.Seconds(), r.seedOneB, r.threeSlowest.Seconds(), r.threeB, r.fourth.Seconds(), r.fourthB)
		rs = append(rs, r)
	}
	med := func(f func(result) float64) float64 {
		var v []float64
		for _, r := range rs {
			v = append(v, f(r))
		}
		sort.Float64s(v)
		return v[len(v)/2]
	}
	alone := med(func(r result) float64 { return r.alone.Seconds() })
	aloneB := med(func(r result) float64 { return float64(r.aloneB) })
	seedOne := med(func(r result) float64 { return r.seedOne.Seconds() })
	seedOneB := med(func(r result) float64 { return float64(r.seedOneB) })
	three := med(func(r result) float64 { return r.threeSlowest.Seconds() })
	threeB := med(func(r result) float64 { return float64(r.threeB) })
	fourth := med(func(r result) float64 { return r.fourth.Seconds() })
	fourthB := med(func(r result) float64 { return float64(r.fourthB) })
	fmt.Printf("\nbench-lazy-p2p: python image, registry behind %s, +10 ms per request, background fetch off, median of %d\n", rate, len(rs))
	fmt.Printf("  one node, no scheduler:          %6.2f s   registry sent %7.1f MB\n", alone, aloneB/1e6)
	fmt.Printf("  scheduler + seed + one node:     %6.2f s   registry sent %7.1f MB   ratio %.2f (target <= 1.10)\n", seedOne, seedOneB/1e6, seedOne/alone)
	fmt.Printf("  three nodes at once, slowest:    %6.2f s   registry sent %7.1f MB   ratio %.2f (target <= 1.25), bytes %.2f of one node alone (target <= 1.05)\n",
		three, threeB/1e6, three/alone, threeB/aloneB)
	fmt.Printf("  a fourth node afterwards:        %6.2f s   registry sent %7.1f MB   ratio %.2f (target <= 0.8), %.2f %% of the image (target < 1 %%)\n",
		fourth, fourthB/1e6, fourth/alone, 100*fourthB/float64(imageBytes(t, layout)))
}

// lazyNode is a starlingd with its snapshotter on, on its own host, and a
// containerd of its own that uses it.
type lazyNode struct {
	*node
	ctd  *testenv.Containerd
	sock string
}

// lazyBench is a cluster of lazy nodes.
type lazyBench struct {
	*cluster
	lazy []*lazyNode
}

// lazyCluster is a cluster with the python image converted to eStargz in
// its registry; ref names it as the nodes reach it. The origin adds 10 ms
// to every request.
func lazyCluster(t *testing.T, prefix, rate, layout string) (*lazyBench, string) {
	t.Helper()
	c := &lazyBench{cluster: newCluster(t, prefix, rate)}
	c.origin.SetLatency(10 * time.Millisecond)
	direct := c.registry.Addr + "/python"
	testenv.Run(t, "skopeo", "copy", "--quiet", "--dest-tls-verify=false", "oci:"+layout+":latest", "docker://"+direct+":3")
	testenv.Run(t, testenv.Bin(t, "starling"), "convert", direct+":3", direct+":esgz")
	return c, c.regHost.IP + ":5000/python:esgz"
}

// close stops the cluster's processes now rather than at the end of the
// test, so that the next set-up starts on a quiet machine.
func (c *lazyBench) close() {
	for _, n := range c.lazy {
		n.ctd.Proc.Stop()
		n.proc.Stop()
		testenv.UnmountUnder(n.root)
	}
	c.sched.Stop()
}

// addLazyNode starts a node whose starlingd serves containerd's snapshots
// API, with the scheduler (withScheduler) or without, and its containerd.
func (c *lazyBench) addLazyNode(name, role string, withScheduler bool) *lazyNode {
	t := c.t
	t.Helper()
	n := &node{c: c.cluster, name: name, host: c.net.AddHost(name), role: role}
	dir, err := os.MkdirTemp("/tmp", "sl-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	n.root = dir
	cfg := fmt.Sprintf("[fs]\nbackground_fetch = false\n[resolver.host.%q]\ninsecure = true\n", c.regHost.IP+":5000")
	if err := os.WriteFile(filepath.Join(dir, "starlingd.toml"), []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	n.client = n.host.HTTPClient()
	c.mu.Lock()
	c.nodes = append(c.nodes, n)
	c.mu.Unlock()
	ln := &lazyNode{node: n, sock: filepath.Join(dir, "sd.sock")}
	ip := n.host.IP
	args := []string{"--config", filepath.Join(dir, "starlingd.toml"), "--root", filepath.Join(dir, "root"),
		"--address", ln.sock, "--role", role, "--log-level", "info",
		"--advertise-ip", ip, "--upload-listen", ip + ":" + uploadPort, "--proxy-listen", ip + ":" + proxyPort,
		"--metrics-listen", ip + ":" + metricsPort, "--health-listen", ip + ":" + healthPort}
	if withScheduler {
		args = append(args, "--scheduler", c.schedAddr)
	}
	// nsenter rather than `ip netns exec`: the latter gives the process a
	// mount namespace of its own, and containerd would not see the layers
	// starlingd mounts.
	n.proc = testenv.Start(t, name, nil, "nsenter", append([]string{"--net=/run/netns/" + n.host.NS, c.starlingd}, args...)...)
	c.mu.Lock()
	n.runs = append(n.runs, n.proc)
	c.mu.Unlock()
	testenv.WaitFor(t, 30*time.Second, name+" snapshotter socket", func() bool {
		if n.proc.Exited() {
			t.Fatalf("%s exited:\n%s", name, n.proc.Log())
		}
		_, err := os.Stat(ln.sock)
		return err == nil
	})
	ln.ctd = testenv.StartContainerd(t, testenv.ContainerdOptions{ProxySnapshotters: map[string]string{"starling": ln.sock}})
	c.lazy = append(c.lazy, ln)
	t.Cleanup(func() {
		n.proc.Stop()
		testenv.UnmountUnder(dir)
		_ = os.RemoveAll(dir)
	})
	return ln
}

// coldStart pulls ref lazily (from the node's own host, as its kubelet
// would) and runs python3 -V; it returns how long both took.
func (n *lazyNode) coldStart(t *testing.T, ref string) time.Duration {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if out, err := testenv.RunErr(ctx, "ip", "netns", "exec", n.host.NS, testenv.Bin(t, "starling"),
		"pull", "--plain-http", "--address", n.ctd.Address, ref); err != nil {
		t.Fatalf("%s: pull: %v\n%s\n%s", n.name, err, out, n.proc.Log())
	}
	out, err := n.ctd.Ctr(ctx, "run", "--rm", "--snapshotter", "starling", ref, "py-"+n.name, "python3", "-V")
	if err != nil || !strings.HasPrefix(out, "Python 3") {
		t.Fatalf("%s: run: %v %q\n%s", n.name, err, out, n.proc.Log())
	}
	return time.Since(start)
}

// imageBytes is the size of the image's layers in the layout.
func imageBytes(t *testing.T, layout string) int64 {
	var total int64
	_ = filepath.Walk(filepath.Join(layout, "blobs"), func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			total += fi.Size()
		}
		return nil
	})
	return total
}
