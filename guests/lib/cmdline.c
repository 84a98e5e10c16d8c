/*
 * The command line: space-separated words; "key=value" words are parameters. Loaders put other
 * words there too (QEMU and GRUB start it with the kernel's file name); those are ignored.
 */
#include "guest.h"

static char line[1024];

void cmdline_init(const char *s)
{
	size_t i = 0;

	while (s[i] && i < sizeof(line) - 1) {
		line[i] = s[i];
		i++;
	}
	line[i] = 0;
}

const char *cmdline(void) { return line; }

/* The last "key=..." word wins, as on Linux. */
bool cmdline_find(const char *key, const char **val, size_t *len)
{
	size_t klen = strlen(key);
	const char *p = line;
	bool found = false;

	while (*p) {
		while (*p == ' ')
			p++;
		const char *word = p;
		while (*p && *p != ' ')
			p++;
		if ((size_t)(p - word) > klen && memcmp(word, key, klen) == 0 && word[klen] == '=') {
			*val = word + klen + 1;
			*len = (size_t)(p - *val);
			found = true;
		}
	}
	return found;
}

/* Decimal, or hexadecimal with 0x; '_' and ',' may group digits (rounds=1,000,000). */
u64 cmdline_u64(const char *key, u64 dflt)
{
	const char *v;
	size_t n, i = 0;
	unsigned base = 10, digits = 0;
	u64 x = 0;

	if (!cmdline_find(key, &v, &n))
		return dflt;
	if (n > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
		base = 16;
		i = 2;
	}
	for (; i < n; i++) {
		char c = v[i];
		unsigned d;
		if (c == '_' || c == ',')
			continue;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			goto bad;
		x = x * base + d;
		digits++;
	}
	if (digits)
		return x;
bad:
	printf("guest: ignoring %s=%.*s: not a number; using %lu\n", key, (int)n, v, dflt);
	return dflt;
}

bool cmdline_list_has(const char *key, const char *word, bool dflt)
{
	const char *v;
	size_t n, wlen = strlen(word);

	if (!cmdline_find(key, &v, &n))
		return dflt;
	for (size_t i = 0; i < n;) {
		size_t j = i;
		while (j < n && v[j] != ',')
			j++;
		if (j - i == wlen && memcmp(v + i, word, wlen) == 0)
			return true;
		i = j + 1;
	}
	return false;
}
