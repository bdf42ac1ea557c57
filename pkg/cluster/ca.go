package cluster

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"time"
)

// Files of a CA directory.
const (
	CACertFile = "ca.crt"
	CAKeyFile  = "ca.key"
)

// caValidity and DefaultValidity bound the certificates made here.
const (
	caValidity      = 10 * 365 * 24 * time.Hour
	DefaultValidity = 365 * 24 * time.Hour
)

// Init makes a cluster CA in dir: ca.crt and ca.key (0600), ECDSA P-256.
// It refuses to overwrite either: a new CA would cut every node off.
func Init(dir string) (certPath, keyPath string, err error) {
	certPath, keyPath = filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	for _, p := range []string{certPath, keyPath} {
		if _, err := os.Stat(p); err == nil {
			return "", "", fmt.Errorf("cluster init: %s exists; refusing to overwrite a CA", p)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return "", "", fmt.Errorf("cluster init: %w", err)
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", "", fmt.Errorf("cluster init: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", fmt.Errorf("cluster init: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return "", "", err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "starling cluster CA", Organization: []string{"starling"}},
		NotBefore:             now.Add(-5 * time.Minute),
		NotAfter:              now.Add(caValidity),
		IsCA:                  true,
		BasicConstraintsValid: true,
		MaxPathLenZero:        true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return "", "", fmt.Errorf("cluster init: make certificate: %w", err)
	}
	if err := writeKey(keyPath, key); err != nil {
		return "", "", err
	}
	if err := writeNew(certPath, pemOf("CERTIFICATE", der), 0o644); err != nil {
		os.Remove(keyPath)
		return "", "", err
	}
	return certPath, keyPath, nil
}

// IssueOptions says what a node certificate names.
type IssueOptions struct {
	// Roles go into the OU; empty is RolePeer.
	Roles []string
	// IPs and DNSNames are SANs: with any, a client checks the address it
	// dialled against them.
	IPs      []net.IP
	DNSNames []string
	// Out is the directory for NODE.crt, NODE.key and a copy of ca.crt;
	// empty is the CA directory.
	Out string
	// Validity of the certificate (0: DefaultValidity).
	Validity time.Duration
}

// Issued names the files Issue wrote.
type Issued struct {
	CA    string   `json:"ca"`
	Cert  string   `json:"cert"`
	Key   string   `json:"key"`
	Name  string   `json:"cn"`
	Roles []string `json:"roles"`
}

var nodeName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$`)

// Issue makes node's certificate, signed by the CA in dir. The
// certificate serves as both server and client certificate, as every
// member is both.
func Issue(dir, node string, o IssueOptions) (Issued, error) {
	if !nodeName.MatchString(node) {
		return Issued{}, fmt.Errorf("cluster issue: node name %q: want letters, digits, '.', '_', '-' (at most 63)", node)
	}
	roles := slices.Clone(o.Roles)
	if len(roles) == 0 {
		roles = []string{RolePeer}
	}
	for _, r := range roles {
		switch r {
		case RolePeer, RoleSeed, RoleScheduler, RoleClient:
		default:
			return Issued{}, fmt.Errorf("cluster issue: unknown role %q", r)
		}
	}
	slices.Sort(roles)
	roles = slices.Compact(roles)
	if o.Out == "" {
		o.Out = dir
	}
	if o.Validity <= 0 {
		o.Validity = DefaultValidity
	}
	caCert, caKey, caPEM, err := loadCA(dir)
	if err != nil {
		return Issued{}, err
	}
	out := Issued{CA: filepath.Join(o.Out, CACertFile), Cert: filepath.Join(o.Out, node+".crt"),
		Key: filepath.Join(o.Out, node+".key"), Name: node, Roles: roles}
	for _, p := range []string{out.Cert, out.Key} {
		if _, err := os.Stat(p); err == nil {
			return Issued{}, fmt.Errorf("cluster issue: %s exists; refusing to overwrite", p)
		}
	}
	if err := os.MkdirAll(o.Out, 0o700); err != nil {
		return Issued{}, fmt.Errorf("cluster issue: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return Issued{}, fmt.Errorf("cluster issue: generate key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return Issued{}, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: node, Organization: []string{"starling"}, OrganizationalUnit: roles},
		NotBefore:    now.Add(-5 * time.Minute),
		NotAfter:     now.Add(o.Validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:  o.IPs,
		DNSNames:     o.DNSNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
	if err != nil {
		return Issued{}, fmt.Errorf("cluster issue: sign: %w", err)
	}
	if err := writeKey(out.Key, key); err != nil {
		return Issued{}, err
	}
	if err := writeNew(out.Cert, pemOf("CERTIFICATE", der), 0o644); err != nil {
		os.Remove(out.Key)
		return Issued{}, err
	}
	if have, err := os.ReadFile(out.CA); err == nil {
		if !bytes.Equal(have, caPEM) {
			return out, fmt.Errorf("cluster issue: %s exists and is another CA's certificate", out.CA)
		}
	} else if err := writeNew(out.CA, caPEM, 0o644); err != nil {
		return out, err
	}
	return out, nil
}

func loadCA(dir string) (*x509.Certificate, any, []byte, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CACertFile))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("cluster CA: %w (make one with starling cluster init)", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, CAKeyFile))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("cluster CA: %w", err)
	}
	cb, _ := pem.Decode(certPEM)
	kb, _ := pem.Decode(keyPEM)
	if cb == nil || kb == nil {
		return nil, nil, nil, fmt.Errorf("cluster CA in %s: not PEM", dir)
	}
	cert, err := x509.ParseCertificate(cb.Bytes)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("cluster CA certificate: %w", err)
	}
	key, err := x509.ParsePKCS8PrivateKey(kb.Bytes)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("cluster CA key: %w", err)
	}
	if !cert.IsCA {
		return nil, nil, nil, fmt.Errorf("cluster CA certificate in %s is not a CA", dir)
	}
	return cert, key, certPEM, nil
}

func newSerial() (*big.Int, error) {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("certificate serial: %w", err)
	}
	return n, nil
}

func pemOf(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func writeKey(path string, key *ecdsa.PrivateKey) error {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return fmt.Errorf("encode key: %w", err)
	}
	return writeNew(path, pemOf("PRIVATE KEY", der), 0o600)
}

// writeNew creates path with mode, failing if it exists.
func writeNew(path string, data []byte, mode os.FileMode) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, mode)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		os.Remove(path)
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
