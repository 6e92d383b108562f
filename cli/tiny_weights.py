"""What every tiny model shares: the seed, a vocabulary of common words, and the weight scaling
that makes random models give varied answers."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

SEED = 0


# Common words get their own ids and anything else splits into letters, so English text
# tokenizes to varied ids rather than a run of [UNK].
WORDS = """
the be to of and a in that have i it for not on with he as you do at this but his by from they
we say her she or an will my one all would there their what so up out if about who get which go me
when make can like time no just him know take people into year your good some could them see other
than then now look only come its over think also back after use two how our work first well way
even new want because any these give day most us is are was were been has had did does said made
went got very much more many great best bad love hate terrible awful wonderful happy sad movie film
book price service food product store order delivery late early fast slow quality cheap expensive
refund broken works working recommend never always again buy bought money worth waste excellent
poor fine okay nice amazing horrible boring fun easy hard help thanks thank please sorry today
tomorrow yesterday week month invoice total amount date name address number account customer
company city street phone email paid due payment tax receipt box page document question answer
where why cat dog car house tree water sun moon red blue green black white small big old young
long short high low left right
""".split()


LETTERS = "abcdefghijklmnopqrstuvwxyz"


DIGITS = "0123456789"


PUNCTUATION = ".,!?;:'\"-()/&$%#@"


def scale(weights: list[torch.Tensor], factor: float) -> None:
    with torch.no_grad():
        for weight in weights:
            weight.mul_(factor)


def standardize_head(model: nn.Module, head: nn.Linear, inputs: Mapping[str, torch.Tensor]) -> None:
    """Rescale `head` so that each of its outputs has mean 0 and std 1 over `inputs`.

    At the default init the outputs sit at a fixed offset and barely move with the input: nine
    different sentences all got NEGATIVE, at scores within 0.004 of one another.
    """
    features: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _module, args, _out: features.append(args[0]))
    with torch.no_grad():
        model(**inputs)
        hook.remove()
        flat = features[0].reshape(-1, head.in_features)
        head.weight.div_((flat @ head.weight.T).std(dim=0).unsqueeze(1))
        head.bias.copy_(-(flat @ head.weight.T).mean(dim=0))


def amplify_attention(model: nn.Module) -> None:
    # Random BERTs carry each token's own embedding almost unchanged along the residual path;
    # louder attention mixes in the rest of the text, so the [CLS] summary and each token's
    # answer logits depend on the whole input. It also keeps standardize_head's gain, and with
    # it the float noise between batched and single calls, low: ~250 instead of ~20,000.
    suffixes = (
        "attention.self.value",
        "attention.output.dense",
        "attention.v_proj",  # ViT in transformers 5
        "attention.o_proj",
    )
    layers = [m for name, m in model.named_modules() if name.endswith(suffixes)]
    scale([layer.weight for layer in layers], 10.0)
