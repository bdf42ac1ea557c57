package testenv

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Containerd is a containerd daemon with its own root, state and socket.
type Containerd struct {
	Root    string
	State   string
	Address string
	Proc    *Proc
}

// ContainerdOptions configures StartContainerd.
type ContainerdOptions struct {
	// ProxySnapshotters maps a snapshotter name to the unix socket it serves on.
	ProxySnapshotters map[string]string
	// ConfigExtra is appended to the generated config.toml.
	ConfigExtra string
}

// StartContainerd starts containerd in temporary directories. The CRI plugin
// is disabled: tests drive containerd through ctr and the Go client.
func StartContainerd(t testing.TB, opts ContainerdOptions) *Containerd {
	t.Helper()
	Require(t, "containerd", "runc", "ctr")
	// containerd's paths end up in unix socket names; keep them short.
	dir, err := os.MkdirTemp("/tmp", "ctd")
	if err != nil {
		t.Fatal(err)
	}
	c := &Containerd{
		Root:    filepath.Join(dir, "root"),
		State:   filepath.Join(dir, "state"),
		Address: filepath.Join(dir, "containerd.sock"),
	}
	var b strings.Builder
	fmt.Fprintf(&b, "version = 2\nroot = %q\nstate = %q\n", c.Root, c.State)
	fmt.Fprintf(&b, "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n")
	fmt.Fprintf(&b, "[grpc]\n  address = %q\n", c.Address)
	fmt.Fprintf(&b, "[ttrpc]\n  address = %q\n", c.Address+".ttrpc")
	for name, sock := range opts.ProxySnapshotters {
		fmt.Fprintf(&b, "[proxy_plugins.%s]\n  type = \"snapshot\"\n  address = %q\n", name, sock)
	}
	b.WriteString(opts.ConfigExtra)
	cfg := filepath.Join(dir, "config.toml")
	if err := os.WriteFile(cfg, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	c.Proc = Start(t, "containerd", nil, "containerd", "--config", cfg, "--log-level", "info")
	WaitFor(t, 30*time.Second, "containerd socket", func() bool {
		if c.Proc.Exited() {
			t.Fatalf("containerd exited:\n%s", c.Proc.Log())
		}
		_, err := RunErr(context.Background(), "ctr", "--address", c.Address, "version")
		return err == nil
	})
	t.Cleanup(func() {
		// Stop leftover tasks so that runc shims and mounts do not outlive the test.
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		// A containerd stopped already (a bench stops set-ups early) has no
		// tasks, and the words of ctr's error are no task IDs.
		out, err := RunErr(ctx, "ctr", "--address", c.Address, "task", "ls", "-q")
		if err != nil || c.Proc.Exited() {
			out = ""
		}
		for _, id := range strings.Fields(out) {
			_, _ = RunErr(ctx, "ctr", "--address", c.Address, "task", "kill", "-s", "SIGKILL", id)
		}
		c.Proc.Stop()
		unmountUnder(dir)
		_ = os.RemoveAll(dir)
	})
	return c
}

// Ctr runs ctr against this containerd and returns its combined output.
func (c *Containerd) Ctr(ctx context.Context, args ...string) (string, error) {
	return RunErr(ctx, "ctr", append([]string{"--address", c.Address}, args...)...)
}

// unmountUnder lazily unmounts every mount below dir, deepest first.
func unmountUnder(dir string) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return
	}
	var mps []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir) {
			mps = append(mps, f[4])
		}
	}
	for i := len(mps) - 1; i >= 0; i-- {
		_, _ = RunErr(context.Background(), "umount", "-l", mps[i])
	}
}

// UnmountUnder lazily unmounts every mount below dir, deepest first.
func UnmountUnder(dir string) { unmountUnder(dir) }
