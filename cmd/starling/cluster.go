package main

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"

	"github.com/spf13/cobra"

	"github.com/starling-dev/starling/pkg/cluster"
)

func init() { subcommands = append(subcommands, newClusterCmd) }

func newClusterCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "Make the cluster CA and the certificates of its nodes (mutual TLS)",
		Long: `Members of a starling cluster (peers, seeds, schedulers, the command line)
authenticate each other with certificates from one cluster CA. "cluster init"
makes the CA; "cluster issue" makes a node's certificate and key, to be named
in the [cluster] section of starlingd.toml or scheduler.toml. See
docs/security.md.`,
	}
	cmd.AddCommand(newClusterInitCmd(), newClusterIssueCmd())
	return cmd
}

func newClusterInitCmd() *cobra.Command {
	var dir string
	cmd := &cobra.Command{
		Use:   "init --dir DIR",
		Short: "Make a cluster CA: DIR/ca.crt and DIR/ca.key",
		Long: `Make a cluster CA (ECDSA P-256, valid 10 years): DIR/ca.crt and DIR/ca.key
(mode 0600). An existing CA is never overwritten: a new one would cut every
node off. Keep ca.key off the nodes; only ca.crt goes to them.`,
		Example: `  starling cluster init --dir /etc/starling/pki`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			certPath, keyPath, err := cluster.Init(dir)
			if err != nil {
				return err
			}
			if g.output == "json" {
				return writeJSONOut(cmd, map[string]string{"ca": certPath, "key": keyPath})
			}
			fmt.Fprintf(cmd.OutOrStdout(), "cluster CA: %s (key %s)\n", certPath, keyPath)
			return nil
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory of the CA (made if missing)")
	_ = cmd.MarkFlagRequired("dir")
	return cmd
}

func newClusterIssueCmd() *cobra.Command {
	var (
		dir, out                    string
		seed, sched, client, noPeer bool
		ips                         []net.IP
		dnsNames                    []string
	)
	cmd := &cobra.Command{
		Use:   "issue NODE --dir DIR",
		Short: "Make a node's certificate and key, signed by the cluster CA",
		Long: `Make NODE.crt and NODE.key (and a copy of ca.crt) in --out (default: --dir),
signed by the CA in --dir. The certificate's CN is NODE, which is also the
peer ID the node announces with, so issue one certificate per node. Its roles
(the OU) say what the node may do: "peer" by default; --seed adds "seed" (may
announce as a seed peer and take preheat work); --scheduler makes a
scheduler's certificate; --client one for the command line only (preheat,
task status; it cannot announce or serve pieces). The certificate is both a
server and a client certificate. With --ip/--dns, clients also check the
address they dial against them: give the node's advertise IP.`,
		Example: `  starling cluster issue node1 --dir /etc/starling/pki --ip 10.0.0.11
  starling cluster issue seed1 --dir /etc/starling/pki --seed --ip 10.0.0.10 --out /tmp/seed1
  starling cluster issue sched1 --dir /etc/starling/pki --scheduler --dns sched1.example.com
  starling cluster issue ops --dir /etc/starling/pki --client`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			var roles []string
			if !noPeer && (seed || (!sched && !client)) {
				roles = append(roles, cluster.RolePeer)
			}
			if seed {
				roles = append(roles, cluster.RoleSeed)
			}
			if sched {
				roles = append(roles, cluster.RoleScheduler)
			}
			if client {
				roles = append(roles, cluster.RoleClient)
			}
			if len(roles) == 0 {
				return fmt.Errorf("cluster issue %s: no role left", args[0])
			}
			is, err := cluster.Issue(dir, args[0], cluster.IssueOptions{Roles: roles, IPs: ips, DNSNames: dnsNames, Out: out})
			if err != nil {
				return err
			}
			if g.output == "json" {
				return writeJSONOut(cmd, is)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "issued %s (roles %v): %s, key %s, CA %s\n", is.Name, is.Roles, is.Cert, is.Key, is.CA)
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "dir", "", "directory of the CA (from cluster init)")
	f.StringVar(&out, "out", "", "directory for NODE.crt, NODE.key, ca.crt (default: --dir)")
	f.BoolVar(&seed, "seed", false, "a seed peer: roles peer and seed")
	f.BoolVar(&sched, "scheduler", false, "a scheduler: role scheduler")
	f.BoolVar(&client, "client", false, "the command line only: role client")
	f.BoolVar(&noPeer, "no-peer", false, "with --seed, leave out the peer role")
	f.IPSliceVar(&ips, "ip", nil, "IP SAN: an address the node is reached at (repeatable)")
	f.StringArrayVar(&dnsNames, "dns", nil, "DNS SAN: a name the node is reached at (repeatable)")
	_ = cmd.MarkFlagRequired("dir")
	_ = f.MarkHidden("no-peer")
	return cmd
}

func writeJSONOut(cmd *cobra.Command, v any) error {
	enc := json.NewEncoder(cmd.OutOrStdout())
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// clusterClientTLS is the cluster identity the command line shows the
// schedulers: the configuration's [cluster] section, overridden by the
// --cluster-* flags. nil: plaintext (no CA configured).
func clusterClientTLS(cmd *cobra.Command) (*tls.Config, error) {
	cfg, err := loadConfig(cmd)
	if err != nil {
		return nil, err
	}
	cc := cfg.Cluster
	if g.clusterCA != "" {
		cc.CA = g.clusterCA
	}
	if g.clusterCert != "" {
		cc.Cert = g.clusterCert
	}
	if g.clusterKey != "" {
		cc.Key = g.clusterKey
	}
	c, err := cluster.Load(cc)
	if err != nil {
		return nil, err
	}
	return c.ClientTLS(cluster.RoleScheduler), nil
}
