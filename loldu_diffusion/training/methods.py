"""What each `--method` trains, checkpoints and writes. One class per method, one interface:

    setup(models)            attach the method, return the trainable parameters
    trainable_state(models)  the tensors a checkpoint must hold to resume exactly
    load_trainable_state(models, tensors)
    save(models, out_dir, metadata) → written paths (the method's natural output)
    load_output(pipe, out_dir)   apply what `save` wrote to a pristine base pipeline
    trains_text_encoder      whether the text encoder(s) run with gradients
    save_checkpoint_models(models, folder)   extra checkpoint content (default: none)
    parameter_sets(params)   the sets whose gradients are clipped apart (default: one)

`models` is a SimpleNamespace with unet, text_encoder, (text_encoder_2) and, for saving,
the path of the base model.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import types

import torch

from ..adapter_file import load_adapter, save_adapter
from ..config import ADAPTER_FILE, LoLDUConfig
from ..embeddings import EMBEDDINGS_FILE, SDXL_EMBEDDING_KEYS, encoder_pairs
from ..io import atomic_save_safetensors
from ..model import inject_loldu, loldu_parameters

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # --output_kohya_format, the name diffusers' SDXL script writes


def _text_encoders(models):
    return [getattr(models, n) for n in ("text_encoder", "text_encoder_2") if getattr(models, n, None) is not None]


class Method:
    """What every method shares: the defaults of the optional parts of the interface."""

    def save_checkpoint_models(self, models, folder) -> None:
        pass

    def parameter_sets(self, params) -> list:
        return [params]

    def after_step(self) -> None:
        """Called after each optimizer step (a projection of what trains, where a method has one)."""

    def text_side_parameters(self) -> list:
        """Trained tensors outside the text encoders' modules that belong with them (a token
        embedding): --text_encoder_lr applies to them, as in diffusers' advanced DreamBooth script."""
        return []


class LoLDUMethod(Method):
    """One adapter ("default"), or under --concepts_list one per subject, named after it: each
    sample of a batch then uses its own subject's adapter (per-sample blends), and each
    subject's file is written to OUTPUT_DIR/NAME/."""

    name = "loldu"

    def __init__(self, args):
        self.args = args
        self.trains_text_encoder = args.train_text_encoder
        self.config = LoLDUConfig(
            rank=args.rank, alpha=args.alpha, init=args.init, unet_targets=args.unet_targets,
            text_encoder_targets=args.text_encoder_targets if args.train_text_encoder else None,
        )
        self.subjects = [c.name for c in getattr(args, "concepts", None) or ()]
        self.sets = []

    def setup(self, models):
        from accelerate.utils import set_seed

        from ..serving import set_sample_weights

        if not self.subjects:
            inject_loldu(models, self.config)
            return loldu_parameters(models)
        for name in self.subjects:
            set_seed(self.args.seed)  # random inits as each subject's own run draws them
            layers = inject_loldu(models, self.config, adapter_name=name)
            self.sets.append([p for layer in layers for p in (layer.adapters[name].z, layer.adapters[name].sigma)])
        set_sample_weights(models, [{name: 1.0} for name in self.subjects])  # batch row j: subject j mod K
        return [p for ps in self.sets for p in ps]

    def parameter_sets(self, params):
        return self.sets or [params]

    def _trainable_modules(self, models):
        mods = {"unet": models.unet}
        if self.args.train_text_encoder:
            mods.update({n: getattr(models, n) for n in ("text_encoder", "text_encoder_2") if getattr(models, n, None) is not None})
        return mods

    def trainable_state(self, models):
        return {f"{c}.{k}": v.detach().clone() for c, m in self._trainable_modules(models).items()
                for k, v in m.state_dict().items() if ".adapters." in k}

    def load_trainable_state(self, models, tensors):
        for c, m in self._trainable_modules(models).items():
            own = {k[len(c) + 1 :]: v for k, v in tensors.items() if k.startswith(c + ".")}
            missing, unexpected = m.load_state_dict(own, strict=False)
            missing = [k for k in missing if ".adapters." in k]
            if missing or unexpected:
                raise ValueError(f"checkpoint does not match this run's adapter ({c}: missing {missing[:2]}, unexpected {unexpected[:2]})")

    def save(self, models, out_dir, metadata):
        if not self.subjects:
            path = os.path.join(out_dir, ADAPTER_FILE)
            save_adapter(models, path, adapter_name="default", metadata=metadata, overwrite=True)
            return [path]
        paths = []
        for c in self.args.concepts:
            paths.append(os.path.join(out_dir, c.name, ADAPTER_FILE))
            os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
            save_adapter(models, paths[-1], adapter_name=c.name, overwrite=True,
                         metadata=metadata | {"instance_prompt": c.instance_prompt, "class_prompt": c.class_prompt, "validation_prompt": None})
        return paths

    def load_output(self, pipe, out_dir):
        """Apply what `save` wrote to a pristine base pipeline."""
        load_adapter(pipe, os.path.join(out_dir, ADAPTER_FILE))

    def save_kohya(self, models, out_dir):
        from ..export import export_lora
        from ..model import get_adapter_weights, set_adapter_weights
        from ..serving import set_sample_weights

        if not self.subjects:
            return [export_lora(models, os.path.join(out_dir, KOHYA_FILE), "kohya", overwrite=True)]
        set_sample_weights(models, None)
        weights, paths = get_adapter_weights(models), []
        try:
            for name in self.subjects:  # each subject's adapter alone
                set_adapter_weights(models, {name: 1.0})
                paths.append(export_lora(models, os.path.join(out_dir, name, KOHYA_FILE), "kohya", overwrite=True))
        finally:
            set_adapter_weights(models, weights)
        return paths


class LoRAMethod(Method):
    """LoRA / OLoRA through PEFT, configured as diffusers' train_dreambooth_lora.py does."""

    def __init__(self, args):
        self.args = args
        self.name = args.method
        self.trains_text_encoder = args.train_text_encoder
        self.init = "olora" if args.method == "olora" else "gaussian"
        self.initial = {}

    def _config(self, targets):
        from peft import LoraConfig

        alpha = self.args.alpha if self.args.alpha is not None else self.args.rank
        return LoraConfig(r=self.args.rank, lora_alpha=alpha, init_lora_weights=self.init, target_modules=list(targets),
                          lora_dropout=getattr(self.args, "lora_dropout", 0.0), use_dora=getattr(self.args, "use_dora", False))

    def _modules(self, models):
        mods = {"unet": models.unet}
        if self.args.train_text_encoder:
            mods.update({n: m for n, m in zip(("text_encoder", "text_encoder_2"), _text_encoders(models))})
        return mods

    def setup(self, models):
        from peft.utils import get_peft_model_state_dict

        params = []
        for c, m in self._modules(models).items():
            if c == "unet":
                m.add_adapter(self._config(self.args.unet_targets))
            else:  # PEFT directly: transformers' add_adapter asks for a PEFT newer than any released
                from peft import inject_adapter_in_model

                inject_adapter_in_model(self._config(self.args.text_encoder_targets), m)
            # OLoRA moved s·B₀A₀ out of the base weights; keep B₀, A₀ to export on the pristine base
            self.initial[c] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(m).items()}
            params += [p for p in m.parameters() if p.requires_grad]
        return params

    def trainable_state(self, models):
        from peft.utils import get_peft_model_state_dict

        state = {f"{c}.{k}": v.detach().clone() for c, m in self._modules(models).items() for k, v in get_peft_model_state_dict(m).items()}
        state.update({f"initial.{c}.{k}": v for c, s in self.initial.items() for k, v in s.items()})
        return state

    def load_trainable_state(self, models, tensors):
        from peft.utils import set_peft_model_state_dict

        for c, m in self._modules(models).items():
            set_peft_model_state_dict(m, {k[len(c) + 1 :]: v for k, v in tensors.items() if k.startswith(c + ".")})
            self.initial[c] = {k[len(c) + 9 :]: v for k, v in tensors.items() if k.startswith(f"initial.{c}.")}

    def pristine_lora_state(self, c, module):
        """LoRA weights that are exact on the *pristine* base: the scale s = alpha/r baked into
        lora_B (so any loader's default alpha = rank works), and for OLoRA the initial product
        subtracted: W + s·B·A − s·B₀·A₀ = W + [sB, −sB₀]·[A; A₀] (rank doubles, as PEFT's
        path_initial_model_for_weight_conversion does)."""
        from peft.utils import get_peft_model_state_dict

        s = (self.args.alpha if self.args.alpha is not None else self.args.rank) / self.args.rank
        state = get_peft_model_state_dict(module)
        out = {}
        for k, A in state.items():
            if ".lora_A." not in k:
                continue
            kb = k.replace(".lora_A.", ".lora_B.")
            B = state[kb]
            if self.init == "olora":
                A0, B0 = self.initial[c][k], self.initial[c][kb]
                A, B = torch.cat([A, A0], 0), torch.cat([s * B, -s * B0], 1)
            else:
                B = s * B
            out[k], out[kb] = A.detach().float().contiguous(), B.detach().float().contiguous()
        return out

    def save(self, models, out_dir, metadata):
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        mods = self._modules(models)
        layers = {c: convert_state_dict_to_diffusers(self.pristine_lora_state(c, m)) for c, m in mods.items()}
        kwargs = {"unet_lora_layers": layers["unet"]}
        if "text_encoder" in layers:
            kwargs["text_encoder_lora_layers"] = layers["text_encoder"]
        if getattr(models, "text_encoder_2", None) is not None:
            if "text_encoder_2" in layers:
                kwargs["text_encoder_2_lora_layers"] = layers["text_encoder_2"]
            saver = StableDiffusionXLPipeline
        else:
            saver = StableDiffusionPipeline
        tmp = os.path.join(out_dir, ".lora.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        saver.save_lora_weights(tmp, safe_serialization=True, **kwargs)
        os.replace(os.path.join(tmp, LORA_FILE), os.path.join(out_dir, LORA_FILE))
        shutil.rmtree(tmp, ignore_errors=True)
        return [os.path.join(out_dir, LORA_FILE)]

    @staticmethod
    def load_output(pipe, out_dir):
        pipe.load_lora_weights(out_dir, weight_name=LORA_FILE)

    def save_kohya(self, models, out_dir):
        """As diffusers' --output_kohya_format: the diffusers file's keys converted to kohya's."""
        from safetensors.torch import load_file
        from diffusers.utils import convert_state_dict_to_kohya, convert_state_dict_to_peft

        state = convert_state_dict_to_kohya(convert_state_dict_to_peft(load_file(os.path.join(out_dir, LORA_FILE))))
        return [atomic_save_safetensors(state, os.path.join(out_dir, KOHYA_FILE), overwrite=True)]


class FullMethod(Method):
    """Full fine-tuning of the UNet (and, with --train_text_encoder, the text encoder), with
    AdamW, Prodigy or Fira (a low-rank optimizer-state budget). With --full_targets, only the
    weights of those modules train (e.g. the attention projections: the check that a base lets
    a subject flow through attention). The output is a whole diffusers pipeline folder, as
    diffusers' train_dreambooth.py writes; checkpoints hold `unet/` (and `text_encoder/`) too."""

    name = "full"

    def __init__(self, args):
        self.args = args
        self.trains_text_encoder = args.train_text_encoder

    def _trained(self, models) -> dict:
        targets = getattr(self.args, "full_targets", None)
        out = {f"unet.{n}": p for n, p in models.unet.named_parameters()
               if not targets or any(n.rsplit(".", 1)[0].endswith("." + t) for t in targets)}
        if self.trains_text_encoder:
            out.update({f"text_encoder.{n}": p for n, p in models.text_encoder.named_parameters()})
        return out

    def setup(self, models):
        trained = self._trained(models)
        for p in trained.values():
            p.requires_grad_(True)
        return list(trained.values())

    def trainable_state(self, models):  # views, not copies: a clone is the whole model (GBs on SD) at each checkpoint
        return {k: v.detach() for k, v in self._trained(models).items()}

    def load_trainable_state(self, models, tensors):
        strict = not getattr(self.args, "full_targets", None)
        models.unet.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, strict=strict)
        if self.trains_text_encoder:
            models.text_encoder.load_state_dict({k[13:]: v for k, v in tensors.items() if k.startswith("text_encoder.")})

    def save_checkpoint_models(self, models, folder):
        """diffusers' checkpoints hold the trained models in their own format: `checkpoint-N/unet`
        loads with UNet2DConditionModel.from_pretrained."""
        models.unet.save_pretrained(os.path.join(folder, "unet"))
        if self.trains_text_encoder:
            models.text_encoder.save_pretrained(os.path.join(folder, "text_encoder"))

    def save(self, models, out_dir, metadata):
        """The whole pipeline: model_index.json, scheduler, tokenizer(s), VAE, text encoder(s)
        (unless --skip_save_text_encoder) and the trained UNet."""
        from diffusers import DiffusionPipeline

        comps = {"unet": models.unet, "text_encoder": models.text_encoder}
        if getattr(models, "text_encoder_2", None) is not None:
            comps["text_encoder_2"] = models.text_encoder_2
        for name, part in getattr(models, "base_parts", {}).items():  # a single-file base: its config folder has no weights
            comps[name] = copy.deepcopy(part).float() if isinstance(part, torch.nn.Module) and part.dtype != torch.float32 else part
        kw = {} if comps.get("text_encoder_2") is not None else {"safety_checker": None, "feature_extractor": None,
                                                                  "requires_safety_checker": False}
        pipe = DiffusionPipeline.from_pretrained(models.base_path, torch_dtype=torch.float32, **comps, **kw)
        written = []
        with tempfile.TemporaryDirectory(dir=out_dir, prefix=".pipeline.tmp") as tmp:
            pipe.save_pretrained(tmp, safe_serialization=True)
            for name in sorted(os.listdir(tmp)):
                if getattr(self.args, "skip_save_text_encoder", False) and name.startswith("text_encoder"):
                    continue
                dest = os.path.join(out_dir, name)
                if os.path.isdir(dest):
                    shutil.rmtree(dest)
                os.replace(os.path.join(tmp, name), dest)
                written.append(dest)
        trained = ("unet", "text_encoder") if self.trains_text_encoder else ("unet",)
        return [w for w in written if os.path.basename(w) in trained]

    def load_output(self, pipe, out_dir):
        from diffusers import UNet2DConditionModel

        tuned = UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet", torch_dtype=pipe.unet.dtype)
        pipe.unet.load_state_dict(tuned.state_dict())
        if self.trains_text_encoder and os.path.isdir(os.path.join(out_dir, "text_encoder")):
            from transformers import CLIPTextModel

            te = CLIPTextModel.from_pretrained(out_dir, subfolder="text_encoder", torch_dtype=pipe.text_encoder.dtype)
            pipe.text_encoder.load_state_dict(te.state_dict())


class PeftVectorMethod(Method):
    """PEFT's other "only vectors train" methods on the same UNet targets as LoLDU: VeRA (frozen
    shared random A, B; trains λ_b, λ_d per layer) and IA³ (trains one scaling vector per layer).
    Peers in the learning benchmark; their output is PEFT's state dict in safetensors."""

    FILE = "peft_adapter.safetensors"
    trains_text_encoder = False

    def __init__(self, args):
        self.args = args
        self.name = args.method

    def _config(self):
        from peft import IA3Config, VeraConfig

        targets = list(self.args.unet_targets)
        if self.name == "vera":  # projections regenerate from PEFT's fixed PRNG key: the file holds only the vectors
            return VeraConfig(r=self.args.rank, target_modules=targets, save_projection=False)
        return IA3Config(target_modules=targets, feedforward_modules=[])

    def _attach(self, unet):
        from peft.tuners.ia3 import IA3Model
        from peft.tuners.vera import VeraModel

        # The tuner injects its layers into `unet` in place (VeRA's shared projections live on
        # the tuner, so diffusers' add_adapter cannot take it); the UNet stays a UNet.
        self.tuner = (VeraModel if self.name == "vera" else IA3Model)(unet, self._config(), "default")

    def setup(self, models):
        self._attach(models.unet)
        return [p for p in models.unet.parameters() if p.requires_grad]

    def trainable_state(self, models):
        from peft.utils import get_peft_model_state_dict

        return {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(models.unet, adapter_name="default", state_dict=None).items()}

    def load_trainable_state(self, models, tensors):
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(models.unet, {k[5:]: v for k, v in tensors.items() if k.startswith("unet.")}, adapter_name="default")

    def save(self, models, out_dir, metadata):
        state = {k[5:]: v.float() for k, v in self.trainable_state(models).items()}
        return [atomic_save_safetensors(state, os.path.join(out_dir, self.FILE), metadata={"method": self.name}, overwrite=True)]

    def load_output(self, pipe, out_dir):
        from safetensors.torch import load_file

        self._attach(pipe.unet)
        self.load_trainable_state(types.SimpleNamespace(unet=pipe.unet), {f"unet.{k}": v for k, v in load_file(os.path.join(out_dir, self.FILE)).items()})


class TextualInversionMethod(Method):
    """Textual inversion: one token embedding trains (the identifier's), nothing else — the
    kilobyte-file anchor among the peers. Initialised from the class word's embedding, as
    diffusers' textual_inversion.py does with --initializer_token. On SDXL the identifier's row
    trains in both text encoders' tables (as diffusers' advanced SDXL script), and the file is
    SDXL's embedding layout, {"clip_l": (1, 768), "clip_g": (1, 1280)}, its token in the metadata."""

    name = "ti"
    FILE = EMBEDDINGS_FILE
    STATE_KEY = "text_encoder.token_embedding"  # its entry in a checkpoint's trainable state (…_2. for SDXL's second)
    trains_text_encoder = True

    def __init__(self, args):
        self.args = args
        self.token = placeholder_token(args)
        self.vectors, self.norms, self.handles = [], [], []

    def _detach(self) -> None:
        """Forget the rows of an earlier setup (the learning bench sets up a fresh base at each checkpoint it judges)."""
        for handle in self.handles:
            handle.remove()
        self.vectors, self.norms, self.handles = [], [], []

    def _attach(self, text_encoder, token_id: int, init_vector):
        vector = torch.nn.Parameter(init_vector.detach().clone().float())

        def replace_token(module, inputs, output):
            mask = (inputs[0] == token_id)[..., None]
            return torch.where(mask, vector.to(output.dtype), output)

        self.handles.append(text_encoder.get_input_embeddings().register_forward_hook(replace_token))
        self.vectors.append(vector)
        self.norms.append(float(vector.detach().norm()))  # the class word's: an in-distribution length

    @staticmethod
    def _state_key(k: int) -> str:
        return TextualInversionMethod.STATE_KEY if k == 0 else f"text_encoder_{k + 1}.token_embedding"

    def setup(self, models):
        init_word = (self.args.class_prompt or "").split()[-1:] or [self.token]
        self._detach()
        for tok, enc in encoder_pairs(models):
            ids = tok(self.token, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise ValueError(f"--method ti: the identifier {self.token!r} is not a single token of this tokenizer")
            init_ids = tok(init_word[0], add_special_tokens=False).input_ids
            self._attach(enc, ids[0], enc.get_input_embeddings().weight[init_ids].mean(0))
        return list(self.vectors)

    def text_side_parameters(self) -> list:
        return list(self.vectors)

    @torch.no_grad()
    def after_step(self) -> None:
        # --ti_norm fixed: back onto the sphere of the initial norm (on the embedded base a free
        # embedding grew from 0.73 to 2.2 in 200 steps while the subject came and went)
        if getattr(self.args, "ti_norm", "free") == "fixed":
            for vector, norm in zip(self.vectors, self.norms):
                vector.mul_(norm / vector.norm().clamp_min(1e-12))

    def trainable_state(self, models):
        return {self._state_key(k): v.detach().clone() for k, v in enumerate(self.vectors)}

    def load_trainable_state(self, models, tensors):
        with torch.no_grad():
            for k, v in enumerate(self.vectors):
                v.copy_(tensors[self._state_key(k)])

    def save(self, models, out_dir, metadata):
        path = os.path.join(out_dir, self.FILE)
        rows = [v.detach().float()[None] for v in self.vectors]
        if len(rows) == 1:
            return [atomic_save_safetensors({self.token: rows[0]}, path, overwrite=True)]
        return [atomic_save_safetensors(dict(zip(SDXL_EMBEDDING_KEYS, rows)), path, metadata={"token": self.token}, overwrite=True)]

    def load_output(self, pipe, out_dir):
        from ..embeddings import read_pipeline_embeddings

        encoders = [enc for _, enc in encoder_pairs(pipe)]
        self._detach()
        for (k, token_id), (_, row) in read_pipeline_embeddings(pipe, os.path.join(out_dir, self.FILE)).items():
            self._attach(encoders[k], token_id, row)


def placeholder_token(args) -> str:
    """--placeholder_token, or the instance prompt's identifier (data.identifier_of: 'sks')."""
    from .data import identifier_of

    if getattr(args, "placeholder_token", None):
        return args.placeholder_token
    token = identifier_of(args.instance_prompt, args.class_prompt)
    if token is None:
        raise ValueError("--method ti and --train_text_encoder_ti need --placeholder_token (the identifier word of --instance_prompt)")
    return token


class PivotalTuning(Method):
    """--train_text_encoder_ti with any method: the identifier's embedding (a
    TextualInversionMethod) trains beside the method's own values and is written beside its
    file, as diffusers' advanced DreamBooth script does for LoRA."""

    def __init__(self, inner: Method, args):
        self.inner, self.ti, self.args = inner, TextualInversionMethod(args), args
        self.trains_text_encoder = True  # gradients reach the embedding through the text encoder

    def __getattr__(self, name):  # name, tuner, config, … are the wrapped method's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def setup(self, models):
        return self.inner.setup(models) + self.ti.setup(models)

    def parameter_sets(self, params):
        return self.inner.parameter_sets(params)

    def adapter_parameters(self, params) -> list:
        """What trains besides the identifier's embedding (held still during --ti_only_steps)."""
        embedding = {id(p) for p in self.ti.text_side_parameters()}
        return [p for p in params if id(p) not in embedding]

    def text_side_parameters(self) -> list:
        return self.inner.text_side_parameters() + self.ti.text_side_parameters()

    def after_step(self) -> None:
        self.inner.after_step()
        self.ti.after_step()

    def save_checkpoint_models(self, models, folder) -> None:
        self.inner.save_checkpoint_models(models, folder)

    def trainable_state(self, models):
        return self.inner.trainable_state(models) | self.ti.trainable_state(models)

    def load_trainable_state(self, models, tensors):
        self.ti.load_trainable_state(models, tensors)
        embedding = set(self.ti.trainable_state(models))  # one key per text encoder (two on SDXL)
        self.inner.load_trainable_state(models, {k: v for k, v in tensors.items() if k not in embedding})

    def save(self, models, out_dir, metadata):
        return self.inner.save(models, out_dir, metadata) + self.ti.save(models, out_dir, metadata)

    def load_output(self, pipe, out_dir):
        self.inner.load_output(pipe, out_dir)
        self.ti.load_output(pipe, out_dir)


def make_method(args):
    method = {"loldu": LoLDUMethod, "lora": LoRAMethod, "olora": LoRAMethod, "full": FullMethod,
              "vera": PeftVectorMethod, "ia3": PeftVectorMethod, "ti": TextualInversionMethod}[args.method](args)
    return PivotalTuning(method, args) if getattr(args, "train_text_encoder_ti", False) else method


def param_groups(args, params, text_encoders, text_side=()) -> list:
    """The optimizer's groups: one, or with --text_encoder_lr / --adam_weight_decay_text_encoder,
    the text encoder's parameters (and `text_side`: a trained token embedding) apart, as
    diffusers' SDXL and advanced scripts."""
    if args.text_encoder_lr is None and args.adam_weight_decay_text_encoder is None:
        return params
    in_text = {id(p) for enc in text_encoders for p in enc.parameters()} | {id(p) for p in text_side}
    te = [p for p in params if id(p) in in_text]
    rest = [p for p in params if id(p) not in in_text]
    if not te:
        return params
    group = {"params": te}
    if args.text_encoder_lr is not None and args.optimizer != "prodigy":  # Prodigy: one lr for all (optimizer_warnings)
        group["lr"] = args.text_encoder_lr
    if args.adam_weight_decay_text_encoder is not None:
        group["weight_decay"] = args.adam_weight_decay_text_encoder
    return [{"params": rest}, group] if rest else [group]


def optimizer_warnings(args) -> list[str]:
    """What Prodigy does differently from AdamW with this run's settled arguments, and where the
    subjects of a --concepts_list run stop being K separate runs; one line each."""
    out = []
    if getattr(args, "concepts", None):
        if args.optimizer == "prodigy":
            out.append("warning: --optimizer prodigy with --concepts_list: Prodigy estimates one step size from all the subjects' "
                       "parameters, so each subject's adapter depends on the others (AdamW keeps them as separate runs would)")
        if args.mixed_precision == "fp16":
            out.append("note: --mixed_precision fp16 with --concepts_list: a step whose gradients overflow for one subject is "
                       "skipped for all (one loss scaler); bf16 or no has no scaler")
    if args.optimizer != "prodigy":
        return out
    if args.text_encoder_lr is not None and args.text_encoder_lr != args.learning_rate:
        # Prodigy raises on groups with different lrs at its first step; diffusers' scripts drop the text encoder's, so do we
        out.append(f"warning: --optimizer prodigy estimates one step size for all parameters: --text_encoder_lr {args.text_encoder_lr:g} "
                   f"is ignored and --learning_rate {args.learning_rate:g} used for everything, as diffusers' scripts do")
    if args.ti_only_steps:
        # AdamW counts each parameter's moments and bias correction from its own first gradient; Prodigy counts one step and
        # one step size for all, so the adapter starts mid-schedule with a step size estimated on the embedding alone
        out.append(f"warning: --optimizer prodigy with the inversion phase (--ti_only_steps {args.ti_only_steps}): the adapter joins "
                   "with Prodigy's step size estimated on the embedding alone (only AdamW was measured with the phase); "
                   "--ti_only_steps 0 trains both from the start")
    return out


def make_optimizer(args, params, lr: float, mixed_precision: str = "no"):
    """AdamW, Prodigy or (full fine-tuning) Fira over `params` (a list, or groups) at `lr`, the
    settled learning rate (--learning_rate, times the batch under --scale_lr); `mixed_precision`
    is the accelerator's."""
    if args.method == "full" and args.optimizer == "fira":
        from ..fira import Fira

        return Fira(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                    weight_decay=args.adam_weight_decay, rank=args.fira_rank,
                    update_proj_gap=args.fira_update_proj_gap, alpha=args.fira_alpha)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2), beta3=args.prodigy_beta3,
                       weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, decouple=args.prodigy_decouple,
                       use_bias_correction=args.prodigy_use_bias_correction, safeguard_warmup=args.prodigy_safeguard_warmup)
    cls = torch.optim.AdamW
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        except ImportError:
            print("--use_8bit_adam: bitsandbytes is not installed; using torch.optim.AdamW")
    # torch's fused AdamW: one kernel for all tensors instead of a Python pass per tensor, which
    # an adapter's hundreds of (r,) vectors (K times that for K subjects) spend most of a step's
    # optimizer time on: 45 → 7 ms for 1,280 of them on a CPU core. Same update to 1 ulp.
    fused = {"fused": True} if cls is torch.optim.AdamW and fused_adamw_runs_on(params, mixed_precision) else {}
    return cls(params, lr=lr, betas=(args.adam_beta1, args.adam_beta2),
               weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **fused)


def fused_adamw_runs_on(params, mixed_precision: str = "no") -> bool:
    """Whether torch's fused AdamW takes these parameters. Not under fp16 mixed precision: a fused
    step skips an overflowed update inside its kernel, so accelerate cannot see the skip and
    would advance the learning-rate schedule on the GradScaler's first, overflowing steps."""
    devices = {"cuda"} | ({"cpu"} if torch.__version__ >= "2.4" else set())  # fused CPU AdamW came in torch 2.4
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return mixed_precision != "fp16" and all(p.device.type in devices and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                             for p in tensors)


def keep_fused_choice(optimizer) -> None:
    """After resuming: `load_state_dict` takes each group's settings from the checkpoint, `fused`
    too, so a checkpoint written by an unfused AdamW would silently slow the run down (and a fused
    one would fail where fusing is not available). Put back what this run chose."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    if type(opt) is not torch.optim.AdamW:
        return
    fused = opt.defaults.get("fused")
    for group in opt.param_groups:
        group["fused"] = fused
        for p in group["params"]:
            state = opt.state.get(p, {})
            if torch.is_tensor(state.get("step")):  # the fused kernel reads the step count where the values are, the others on the CPU
                state["step"] = state["step"].to(p.device if fused else "cpu", torch.float32)
