// SPDX-License-Identifier: Apache-2.0
//
// xdpgen: an in-kernel packet generator for bench/prefilter.sh.
//
//   xdpgen IFNAME SECONDS
//
// Sends the 60-byte UDP frame 203.0.113.9:40000 -> 192.0.2.1:9 (Ethernet
// 0a:00:00:00:00:a1 -> 0a:00:00:00:00:b1) out of IFNAME, from inside the
// kernel, for about SECONDS (1-60) and prints "FRAMES ELAPSED_SECONDS". No socket buffer is
// built on the way: BPF_PROG_TEST_RUN in live-frames mode
// (BPF_F_TEST_XDP_LIVE_FRAMES, Linux 5.18+) runs a four-instruction XDP
// program that redirects each frame to IFNAME; on a veth the frames reach
// the peer's receive ring as XDP frames, as a NIC's DMA'd buffers reach its
// driver. That is what lets the bench compare a drop in XDP (no skb at
// all) with a drop in iptables (an skb built, then the IP layer and
// netfilter) on the receive side alone; a generator using a packet socket
// (trafgen) builds an skb per packet on the sender, for both.
//
// Build: gcc -O2 -o xdpgen bench/xdpgen.c -lbpf (Debian libbpf-dev).
// The frames go only to IFNAME, a link the bench made in its own namespace.
#include <errno.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <bpf/bpf.h>
#include <linux/bpf.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint16_t ip_checksum(const uint8_t *hdr, int len)
{
	uint32_t sum = 0;
	for (int i = 0; i < len; i += 2)
		sum += (uint32_t)hdr[i] << 8 | hdr[i + 1];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: xdpgen IFNAME SECONDS\n");
		return 2;
	}
	unsigned int ifindex = if_nametoindex(argv[1]);
	if (!ifindex) {
		fprintf(stderr, "xdpgen: no interface %s in this namespace\n", argv[1]);
		return 1;
	}
	double seconds = atof(argv[2]);
	if (seconds < 1 || seconds > 60) {
		fprintf(stderr, "xdpgen: SECONDS must be 1-60\n");
		return 2;
	}

	// r1 = ifindex; r2 = 0; r0 = bpf_redirect(r1, r2); exit
	struct bpf_insn prog[] = {
	    {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_1, .imm = (int)ifindex},
	    {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_2, .imm = 0},
	    {.code = BPF_JMP | BPF_CALL, .imm = BPF_FUNC_redirect},
	    {.code = BPF_JMP | BPF_EXIT},
	};
	char log[4096] = "";
	LIBBPF_OPTS(bpf_prog_load_opts, load, .log_buf = log, .log_size = sizeof(log),
		    .log_level = 1);
	int fd = bpf_prog_load(BPF_PROG_TYPE_XDP, "xdpgen", "GPL", prog, 4, &load);
	if (fd < 0) {
		fprintf(stderr, "xdpgen: loading the program: %s\n%s", strerror(errno), log);
		return 1;
	}

	uint8_t frame[60] = {
	    0x0a,
	    0x00,
	    0x00,
	    0x00,
	    0x00,
	    0xb1,
	    0x0a,
	    0x00,
	    0x00,
	    0x00,
	    0x00,
	    0xa1,
	    0x08,
	    0x00,
	    /* IPv4, 46 bytes, DF, TTL 64, UDP */
	    0x45,
	    0x00,
	    0x00,
	    0x2e,
	    0x00,
	    0x01,
	    0x40,
	    0x00,
	    0x40,
	    0x11,
	    0x00,
	    0x00,
	    203,
	    0,
	    113,
	    9,
	    192,
	    0,
	    2,
	    1,
	    /* UDP 40000 -> 9, 26 bytes, no checksum */
	    0x9c,
	    0x40,
	    0x00,
	    0x09,
	    0x00,
	    0x1a,
	    0x00,
	    0x00,
	};
	memset(frame + 42, 0x41, sizeof(frame) - 42);
	uint16_t csum = ip_checksum(frame + 14, 20);
	frame[24] = csum >> 8;
	frame[25] = csum & 0xff;

	// One call sends `repeat` frames; calls follow each other until the
	// time is up (a call of 2^16 frames lasts a fraction of a second).
	unsigned long long sent = 0;
	double start = now(), t = start;
	while (t < start + seconds) {
		LIBBPF_OPTS(bpf_test_run_opts, run, .data_in = frame, .data_size_in = sizeof(frame),
			    .repeat = 1 << 16, .flags = BPF_F_TEST_XDP_LIVE_FRAMES,
			    .batch_size = 64);
		if (bpf_prog_test_run_opts(fd, &run)) {
			fprintf(stderr, "xdpgen: BPF_PROG_TEST_RUN (live frames): %s\n",
				strerror(errno));
			return 1;
		}
		sent += 1 << 16;
		t = now();
	}
	printf("%llu %.3f\n", sent, t - start);
	return 0;
}
